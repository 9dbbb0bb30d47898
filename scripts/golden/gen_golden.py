#!/usr/bin/env python3
"""Generate golden fixtures for the Rust bert2bert model from HF transformers.

NOT run in CI. The outputs are committed under model/tests/fixtures/<name>/:
    config.json, model.safetensors (written by transformers' save_pretrained), golden.safetensors

Re-run (needs torch, transformers 5.x, safetensors):
    python3 scripts/golden/gen_golden.py [--out model/tests/fixtures]

Fixtures: tiny_bert2bert, tiny_bertshare, tiny_roberta2roberta, tiny_robertashare, tiny_bert2roberta (a BERT encoder
and a RoBERTa decoder with two vocabularies); `--only a,b` writes just those (seeds stay per fixture).
RoBERTa sides: vocab 89, pad 1, <s> 0 (= decoder start), </s> 2 (= eos), type_vocab_size 1, LayerNorm eps 1e-5,
max positions 42 (positions start at pad + 1 = 2, as create_position_ids_from_input_ids counts), module names
decoder.roberta.* and decoder.lm_head.{dense,layer_norm,bias}.

BERT config: vocab 97, hidden 20, 4 heads (head_dim 5, not a power of two), 2 encoder + 2 decoder layers,
intermediate 37, max positions 40, gelu, LayerNorm eps 1e-12. Token ids: pad 0, cls 2 (= decoder start), sep 3 (= eos).
Every parameter is perturbed with random values so nothing is trivially 0 or 1.

Tied parameters (printed by this script: state_dict vs named_parameters, transformers 5.24):
  tiny_bert2bert: state_dict 103 names, named_parameters 101. Aliases not stored in model.safetensors:
      decoder.cls.predictions.decoder.weight  ->  decoder.bert.embeddings.word_embeddings.weight
      decoder.cls.predictions.decoder.bias    ->  decoder.cls.predictions.bias
  tiny_bertshare: the same two, plus 37 decoder.bert.* tensors (embeddings + every non-crossattention layer tensor)
      shared with encoder.<same suffix>; named_parameters 64 (tied in Python by this script, see below).

IMPORTANT facts about transformers 5.24 and bertShare (checked concretely):
  * transformers 5.x no longer implements `tie_encoder_decoder` at all (the word does not occur in its source);
    the key survives in config.json only as an inert attribute. EncoderDecoderModel(config) with
    tie_encoder_decoder=True builds UNTIED encoder/decoder stacks.
  * save_pretrained() of a model whose encoder/decoder tensors have been tied by hand raises
    "RuntimeError: The weights trying to be saved contained shared tensors ...".
  * A model.safetensors that OMITS the shared decoder.bert.* keys loads with 38 MISSING keys (the 37 shared
    decoder.bert.* + decoder.cls.predictions.decoder.weight) which transformers then initialises RANDOMLY.
  * A model.safetensors that contains ALL decoder.bert.* keys duplicated from encoder.* loads cleanly: no
    missing, no unexpected keys (the stacks come back untied but equal).
  So the bertshare fixture stores every decoder.bert.* key (duplicated values), config.json carries
  "tie_encoder_decoder": true, and the reference computation ties the tensors in Python (old-transformers
  semantics: one tensor, used by both stacks). For a shared tensor the golden gradient is the SUM of its encoder
  and decoder uses, written under BOTH names (grad.encoder.X and grad.decoder.bert.X are equal).

golden.safetensors contents (B=3 examples):
  src_ids I32 [B,S]      [CLS] toks [SEP], right-padded with 0
  src_mask F32 [B,S]     1 for real tokens, 0 for padding
  dec_ids I32 [B,T]      [CLS] + target toks, right-padded with 0
  labels I32 [B,T]       target toks + [SEP], right-padded with -100
  logits F32 [B,T,V]     decoder logits (eval mode, float64 reference)
  per_example_loss F32 [B]  mean token cross-entropy over each example's label tokens
  mean_loss F32 [1]      cross-entropy averaged over ALL label tokens (= HF outputs.loss with labels)
  mean_loss_ls01 F32 [1] torch CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100) (mean over label tokens;
                         smoothing mass spread over all V classes: (1-e)*nll + e*mean_v(-log p_v))
  grad.<name> F32        d mean_loss / d param for every stored tensor name (tied aliases
                         decoder.cls.predictions.decoder.* skipped; encoder.pooler.* written as zeros)
All reference numbers are computed in float64 from the float32 weights stored in model.safetensors.
"""
import argparse
import json
import os
import shutil
import sys
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, RobertaConfig


class Family:
    """What differs between BERT and RoBERTa for these fixtures: special ids (the roles of [CLS]/[SEP]/[PAD] are
    RoBERTa's <s>/</s>/<pad>), the vocabulary, the decoder stack's and LM head's module names, and the position
    table (RoBERTa's positions start at pad + 1, so it has pad + 1 more rows for the same 40 usable positions)."""

    def __init__(self, name, pad, cls, sep, vocab, stack, head, tied, eps, type_vocab):
        self.name, self.pad, self.cls, self.sep, self.vocab = name, pad, cls, sep, vocab
        self.stack, self.head, self.tied, self.eps, self.type_vocab = stack, head, tied, eps, type_vocab

    def config(self, decoder: bool):
        make = BertConfig if self.name == "bert" else RobertaConfig
        extra = {} if self.name == "bert" else {"bos_token_id": self.cls, "eos_token_id": self.sep}
        return make(
            vocab_size=self.vocab,
            hidden_size=20,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=37,
            max_position_embeddings=40 + (0 if self.name == "bert" else self.pad + 1),
            type_vocab_size=self.type_vocab,
            hidden_act="gelu",
            layer_norm_eps=self.eps,
            pad_token_id=self.pad,
            is_decoder=decoder,
            add_cross_attention=decoder,
            **extra,
        )

    def aliases(self):
        """The decoder's tied LM-head names (not stored), each with the tensor it aliases."""
        return {
            f"decoder.{self.tied}.weight": f"decoder.{self.stack}.embeddings.word_embeddings.weight",
            f"decoder.{self.tied}.bias": f"decoder.{self.head}.bias",
        }


BERT = Family("bert", pad=0, cls=2, sep=3, vocab=97, stack="bert", head="cls.predictions",
              tied="cls.predictions.decoder", eps=1e-12, type_vocab=2)
# A different vocabulary size than BERT's, so bert2roberta has two vocabularies.
ROBERTA = Family("roberta", pad=1, cls=0, sep=2, vocab=89, stack="roberta", head="lm_head", tied="lm_head.decoder",
                 eps=1e-5, type_vocab=1)


def build_config(enc: Family, dec: Family, share: bool) -> EncoderDecoderConfig:
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(enc.config(False), dec.config(True))
    cfg.tie_encoder_decoder = share
    cfg.decoder_start_token_id = dec.cls
    cfg.pad_token_id = dec.pad
    cfg.eos_token_id = dec.sep
    return cfg


def decoder_stack(model: EncoderDecoderModel, dec: Family):
    return getattr(model.decoder, dec.stack)


def lm_projection(model: EncoderDecoderModel, dec: Family):
    return model.decoder.cls.predictions.decoder if dec.name == "bert" else model.decoder.lm_head.decoder


def tie_shared(model: EncoderDecoderModel, dec: Family) -> list:
    """bertShare/robertaShare: make every decoder.<stack>.X parameter the same Parameter object as encoder.X.

    Cross-attention has no encoder counterpart and stays decoder-only. The LM-head projection, tied by transformers
    to the decoder word embeddings, is re-pointed to the (now shared) word embeddings. Returns the tied names."""
    enc = dict(model.encoder.named_parameters())
    tied = []
    stack = decoder_stack(model, dec)
    for mod_name, mod in stack.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)):
            suffix = f"{mod_name}.{pname}" if mod_name else pname
            if suffix in enc:
                setattr(mod, pname, enc[suffix])
                tied.append(f"decoder.{dec.stack}." + suffix)
    lm_projection(model, dec).weight = stack.embeddings.word_embeddings.weight
    assert lm_projection(model, dec).weight is model.encoder.embeddings.word_embeddings.weight
    return tied


def report_ties(model, title):
    sd = model.state_dict()
    named = dict(model.named_parameters())
    by_ptr = {}
    for k, v in sd.items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    groups = [g for g in by_ptr.values() if len(g) > 1]
    print(f"[{title}] state_dict: {len(sd)} names, named_parameters: {len(named)}")
    print(f"[{title}] state_dict names not in named_parameters: {[k for k in sd if k not in named]}")
    print(f"[{title}] {len(groups)} groups of names sharing storage:")
    for g in groups:
        print("    " + "  ==  ".join(g))


@torch.no_grad()
def perturb(model, gen):
    # named_parameters() yields each shared Parameter once, so tied tensors are perturbed once.
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name or "layer_norm.weight" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:  # biases and LayerNorm biases
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:  # weight matrices and embeddings
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def make_batch(gen, src_lens, tgt_lens, enc: Family, dec_f: Family):
    """Sources framed with the encoder's specials and vocabulary, targets with the decoder's."""
    B = len(src_lens)
    S = max(src_lens) + 2
    T = max(tgt_lens) + 1
    src = torch.full((B, S), enc.pad, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.float32)
    dec = torch.full((B, T), dec_f.pad, dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    for b in range(B):
        s = torch.randint(5, enc.vocab, (src_lens[b],), generator=gen)
        t = torch.randint(5, dec_f.vocab, (tgt_lens[b],), generator=gen)
        row = torch.cat([torch.tensor([enc.cls]), s, torch.tensor([enc.sep])])
        src[b, : len(row)] = row
        mask[b, : len(row)] = 1.0
        dec[b, : 1 + len(t)] = torch.cat([torch.tensor([dec_f.cls]), t])
        lab[b, : len(t) + 1] = torch.cat([t, torch.tensor([dec_f.sep])])
    return src, mask, dec, lab


def generate(name, enc, dec_f, share, out_root, seed):
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    model = EncoderDecoderModel(config=build_config(enc, dec_f, share))
    if share:
        tie_shared(model, dec_f)
    perturb(model, gen)
    report_ties(model, name)

    # Save. transformers 5.x refuses to save encoder/decoder shared tensors, so for bertshare copy the (tied) values
    # into an untied model first: the file then holds every decoder.bert.* key with the encoder's values.
    if share:
        plain = EncoderDecoderModel(config=build_config(enc, dec_f, True))
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        plain.load_state_dict(sd, strict=True)
        plain.save_pretrained(out, safe_serialization=True)
        del plain
    else:
        model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        stored = sorted(f.keys())
    print(f"[{name}] model.safetensors: {len(stored)} tensors; decoder.{dec_f.stack}.* stored: "
          f"{sum(k.startswith(f'decoder.{dec_f.stack}.') for k in stored)}; not stored: "
          f"{sorted(set(model.state_dict()) - set(stored))}")

    # Reload exactly what was written (checks the round trip), then go to float64.
    ref, info = EncoderDecoderModel.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"[{name}] unexpected loading info: {bad}")
    ref = ref.double()
    ref.eval()  # dropout off
    if share:
        tie_shared(ref, dec_f)  # after .double(): the conversion must not be what breaks the sharing
    assert lm_projection(ref, dec_f).weight is decoder_stack(ref, dec_f).embeddings.word_embeddings.weight
    for p in ref.parameters():
        p.requires_grad_(True)
    with torch.no_grad():  # f64 weights equal the stored f32 values exactly
        for k, v in ref.state_dict().items():
            if v.is_floating_point():
                assert torch.equal(v, v.float().double()), k

    src, mask, dec, lab = make_batch(gen, [7, 4, 6], [5, 2, 4], enc, dec_f)
    # transformers derives decoder_input_ids from labels by shift_tokens_right; the explicit ones must agree on
    # every labelled position (they differ only after the end, where labels are -100 and causality hides it).
    shifted = ref.prepare_decoder_input_ids_from_labels(labels=lab)
    valid = lab != -100
    assert torch.equal(shifted[valid], dec[valid]), "decoder_input_ids disagree with shift_tokens_right(labels)"

    out_hf = ref(input_ids=src, attention_mask=mask.long(), labels=lab)  # HF path: decoder ids from labels
    outputs = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec)
    logits = outputs.logits  # [B,T,V] float64
    V = logits.shape[-1]
    tok_ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), lab.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(lab.shape)
    n_tok = valid.sum(dim=1)
    per_example = tok_ce.sum(dim=1) / n_tok
    mean_loss = tok_ce.sum() / valid.sum()
    assert torch.allclose(mean_loss, out_hf.loss, rtol=1e-12, atol=0), (mean_loss, out_hf.loss)
    ls = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)(logits.reshape(-1, V), lab.reshape(-1))

    ref.zero_grad(set_to_none=True)
    mean_loss.backward()

    tensors = {
        "src_ids": src.to(torch.int32),
        "src_mask": mask,
        "dec_ids": dec.to(torch.int32),
        "labels": lab.to(torch.int32),
        "logits": logits.detach().float(),
        "per_example_loss": per_example.detach().float(),
        "mean_loss": mean_loss.detach().float().reshape(1),
        "mean_loss_ls01": ls.detach().float().reshape(1),
    }
    params = dict(ref.named_parameters(remove_duplicate=False))
    n_zero_pool = 0
    for k in ref.state_dict():
        if k in dec_f.aliases() or k not in params:
            continue  # tied alias (not stored) or buffer
        g = params[k].grad
        if g is None:
            assert k.startswith("encoder.pooler."), f"no gradient for {k}"
            g = torch.zeros_like(params[k])
            n_zero_pool += 1
        tensors["grad." + k] = g.detach().float().contiguous()
    missing_grads = [k for k in stored if "grad." + k not in tensors]
    assert not missing_grads, missing_grads

    meta = {
        "generator": "scripts/golden/gen_golden.py",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "variant": name.removeprefix("tiny_"),
        "seed": str(seed),
        "ids": {"encoder": {"pad": enc.pad, "cls": enc.cls, "sep": enc.sep},
                "decoder": {"pad": dec_f.pad, "cls": dec_f.cls, "sep": dec_f.sep}},
        "shared_grads": f"decoder.{dec_f.stack}.* shared with encoder.*: grad is the sum of both uses, "
        "written under both names"
        if share
        else "none",
    }
    # One metadata key holding a JSON string: safetensors writes metadata from a hash map, so several keys would come
    # out in a random order and the file bytes would change on every run.
    save_file(tensors, os.path.join(out, "golden.safetensors"), metadata={"golden": json.dumps(meta, sort_keys=True)})

    # summary
    key_bias = max(tensors[k].abs().max().item() for k in tensors if k.endswith("self.key.bias"))
    print(f"[{name}] src {tuple(src.shape)} dec {tuple(dec.shape)} label tokens {int(valid.sum())} {n_tok.tolist()}")
    print(f"[{name}] per_example_loss {[round(x, 6) for x in per_example.tolist()]}")
    print(f"[{name}] mean_loss {mean_loss.item():.9f} (HF outputs.loss {out_hf.loss.item():.9f}) "
          f"mean_loss_ls01 {ls.item():.9f}")
    print(f"[{name}] {sum(k.startswith('grad.') for k in tensors)} grads; pooler grads zero-filled: {n_zero_pool}; "
          f"max |grad key.bias| {key_bias:.2e}")
    gmax = sorted(((tensors[k].abs().max().item(), k) for k in tensors if k.startswith("grad.")), reverse=True)
    print(f"[{name}] largest |grad|: {gmax[0][1]} {gmax[0][0]:.3e}; smallest non-pooler/key-bias: " +
          str([(k, f'{v:.2e}') for v, k in gmax if 'pooler' not in k and 'key.bias' not in k][-1]))
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    print(f"[{name}] files: {sizes}")
    return sum(sizes.values())


def main():
    # EncoderDecoderModel warns (FutureWarning) on every forward with labels; it is noise here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "model", "tests", "fixtures"))
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--only", help="comma-separated fixture names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    total = 0
    fixtures = [
        ("tiny_bert2bert", BERT, BERT, False),
        ("tiny_bertshare", BERT, BERT, True),
        ("tiny_roberta2roberta", ROBERTA, ROBERTA, False),
        ("tiny_robertashare", ROBERTA, ROBERTA, True),
        # Two families and two vocabularies: a BERT encoder (97 tokens) and a RoBERTa decoder (89).
        ("tiny_bert2roberta", BERT, ROBERTA, False),
    ]
    only = set(args.only.split(",")) if args.only else None
    for i, (name, enc, dec_f, share) in enumerate(fixtures):
        if only is None or name in only:
            total += generate(name, enc, dec_f, share, os.path.normpath(args.out), args.seed + i)
    print(f"total fixture bytes: {total}")


if __name__ == "__main__":
    main()
