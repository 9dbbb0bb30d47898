#!/usr/bin/env python3
"""Tiny random pre-trained checkpoints as transformers saves them, for the RoBERTa and two-vocabulary checks.

NOT run in CI (needs torch, transformers 5.x, tokenizers). Writes, under --out:
    tiny-roberta/  RobertaForMaskedLM (roberta.* + lm_head.*), config.json, model.safetensors, and a byte-level BPE
                   tokenizer.json (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4) trained on --text
    tiny-bert/     BertForMaskedLM (bert.* + cls.predictions.*) of the same hidden size, and a WordPiece tokenizer.json
                   (uncased) trained on the same text: a second vocabulary for bert2roberta
Both have hidden 32, 2 layers, 4 heads, intermediate 37; weights are transformers' own random init (seeded).

    python3 scripts/golden/gen_tiny_pretrained.py --text ../shared/data/kjv_web/train.jsonl --out /tmp/tiny
"""
import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM


def texts(path, n):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            out += [obj["source"], obj["target"]]
            if len(out) >= 2 * n:
                break
    return out


def byte_level_bpe(corpus, vocab):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def wordpiece(corpus, vocab):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", required=True, help="JSONL with source/target: the tokenizers' training text")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    corpus = texts(args.text, args.pairs)

    torch.manual_seed(args.seed)
    rtok = byte_level_bpe(corpus, 800)
    rcfg = RobertaConfig(vocab_size=rtok.get_vocab_size(), max_position_embeddings=130, type_vocab_size=1,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **SIZES)
    out = os.path.join(args.out, "tiny-roberta")
    RobertaForMaskedLM(rcfg).save_pretrained(out, safe_serialization=True)
    rtok.save(os.path.join(out, "tokenizer.json"))

    btok = wordpiece(corpus, 700)
    bcfg = BertConfig(vocab_size=btok.get_vocab_size(), max_position_embeddings=128, type_vocab_size=2,
                      pad_token_id=btok.token_to_id("[PAD]"), **SIZES)
    out_b = os.path.join(args.out, "tiny-bert")
    BertForMaskedLM(bcfg).save_pretrained(out_b, safe_serialization=True)
    btok.save(os.path.join(out_b, "tokenizer.json"))
    for d in (out, out_b):
        print(d, sorted(os.listdir(d)))
    print(f"roberta vocab {rtok.get_vocab_size()}, bert vocab {btok.get_vocab_size()}")


if __name__ == "__main__":
    main()
