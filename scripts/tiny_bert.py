#!/usr/bin/env python3
"""A tiny random BERT for smoke runs: `tiny_bert.py DATA.jsonl OUT_DIR`.

A small WordPiece vocabulary from the first 400 pairs of DATA (nothing is downloaded), hidden
size 48, 2 layers. With torch and transformers: weights and a tokenizer (OUT_DIR/variant says
`bert2bert`, for `bert2bert init --variant bert2bert`). Without them: config.json and
tokenizer.json written with the standard library only (`variant` says `rnd2rnd`: the model
starts from random weights). Used by worker-smoke.sh and slurm-single-node.sh.
"""
import collections, json, os, re, sys

data, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
words = collections.Counter()
with open(data) as f:
    for i, line in enumerate(f):
        if i >= 400:
            break
        row = json.loads(line)
        words.update(re.findall(r"[a-z]+|[^\sa-z]", (row["source"] + " " + row["target"]).lower()))
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(300)]
with open(os.path.join(out, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
shape = dict(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
             intermediate_size=96, max_position_embeddings=64)
try:
    from transformers import BertConfig, BertModel, BertTokenizerFast
    import torch
except ImportError as e:
    print(f"tiny_bert: no torch/transformers in {sys.executable} ({e}): writing config.json and "
          "tokenizer.json with the standard library; the job starts from random weights (rnd2rnd)")
    special = [dict(id=i, content=w, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
               for i, w in enumerate(vocab[:5])]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
           "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                          "strip_accents": None, "lowercase": True},
           "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
           "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                     "max_input_chars_per_word": 100, "vocab": {w: i for i, w in enumerate(vocab)}}}
    cfg = dict(architectures=["BertModel"], model_type="bert", type_vocab_size=2, hidden_act="gelu",
               layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
               initializer_range=0.02, **shape)
    for name, obj in (("tokenizer.json", tok), ("config.json", cfg)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f)
    variant = "rnd2rnd"
else:
    tok = BertTokenizerFast(vocab_file=os.path.join(out, "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(**shape), add_pooling_layer=True).save_pretrained(out, safe_serialization=True)
    variant = "bert2bert"
with open(os.path.join(out, "variant"), "w") as f:
    f.write(variant + "\n")
print(f"vocab {len(vocab)}, hidden 48, 2 layers; init --variant {variant}")
