#!/usr/bin/env python3
"""Check a model directory written by `bert2bert init` (or a bert2bert checkpoint) against HF transformers.

    python3 scripts/hf_check.py --model DIR --data FILE.jsonl --n 16 \
        [--score-json S.json] [--grads G.safetensors] [--rtol-loss 1e-4] [--rtol-grad 1e-3]

1. Loads EncoderDecoderModel.from_pretrained(DIR, output_loading_info=True) and fails on any missing, unexpected or
   mismatched key, except the tied LM-head aliases decoder.cls.predictions.decoder.{weight,bias}, which are never
   stored. Also checks config.json's decoder_start_token_id / pad_token_id against the tokenizer.
2. bertShare (config "tie_encoder_decoder": true): transformers 5.x no longer implements that flag. It loads the
   decoder.bert.* tensors as separate copies, and initialises them RANDOMLY when they are missing from the file. So a
   bertshare checkpoint must store every decoder.bert.* key (equal to encoder.*). Missing shared keys are a failure
   unless --allow-missing-shared is given. This script then ties them in Python, so one tensor is used by both
   stacks (the old transformers semantics), and the gradient of a shared tensor is the sum of its encoder and decoder
   uses. It is accepted under either name.
3. Tokenizes the first --n pairs of --data with DIR/tokenizer.json (tokenizers library, padding and truncation off;
   targets with DIR/decoder_tokenizer.json when the model has two vocabularies; RoBERTa's <s>/</s>/<pad> in place of
   [CLS]/[SEP]/[PAD], and decoder.roberta.* / decoder.lm_head.* names, when the decoder is a RoBERTa):
       source   = [CLS] toks[:126] [SEP]
       dec_in   = [CLS] + tgt[:127]
       labels   = tgt[:127] + [SEP]       (padding: the pad id, labels -100)
   and computes the per-example mean token cross-entropy in eval mode (no dropout), in float32 and in float64.
4. --score-json: compares `bert2bert score --json` output ("per_example_loss", and "mean_loss" / "tokens" when
   present). The float64 reference is the judge; the float32 error is printed for information.
5. --grads: compares `bert2bert score --grads-out` (HF name -> d mean CE over ALL label tokens / d param) with float64
   autograd, per tensor, using rel = max|a-b| / max(max|b|, 1e-6). Attention key biases have a true gradient of
   zero (softmax ignores a per-row shift); they must satisfy max|a| < --atol-keybias. encoder.pooler.* must be
   absent or all zero.
Exit code 0 when everything passes, 1 on any failure, 2 on bad usage.
"""
import argparse
import glob
import json
import math
import os
import sys
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import EncoderDecoderModel

# The decoder's family (config.json's decoder model_type): its stack attribute and the tied LM-head aliases.
FAMILIES = {
    "bert": ("bert", {
        "decoder.cls.predictions.decoder.weight": "decoder.bert.embeddings.word_embeddings.weight",
        "decoder.cls.predictions.decoder.bias": "decoder.cls.predictions.bias",
    }),
    "roberta": ("roberta", {
        "decoder.lm_head.decoder.weight": "decoder.roberta.embeddings.word_embeddings.weight",
        "decoder.lm_head.decoder.bias": "decoder.lm_head.bias",
    }),
}
STACK, LM_ALIASES = FAMILIES["bert"]  # set from the model's config in main()
MAX_SRC_TOKS = 126
MAX_TGT_TOKS = 127


def log(msg=""):
    print(msg, flush=True)


class Failures:
    def __init__(self):
        self.items = []

    def add(self, msg):
        self.items.append(msg)
        log(f"FAIL: {msg}")


def shared_names(model):
    """decoder.bert.<suffix> -> encoder.<suffix> for every decoder parameter that has an encoder counterpart."""
    enc = {n for n, _ in model.encoder.named_parameters()}
    out = {}
    for n, _ in getattr(model.decoder, STACK).named_parameters(remove_duplicate=False):
        if n in enc:
            out[f"decoder.{STACK}." + n] = "encoder." + n
    return out


def tie_shared(model):
    """Make each decoder.bert.X the same Parameter as encoder.X (bertShare); re-point the LM-head projection."""
    enc = dict(model.encoder.named_parameters())
    stack = getattr(model.decoder, STACK)
    for mod_name, mod in stack.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)):
            suffix = f"{mod_name}.{pname}" if mod_name else pname
            if suffix in enc:
                setattr(mod, pname, enc[suffix])
    lm_projection(model).weight = stack.embeddings.word_embeddings.weight


def lm_projection(model):
    return model.decoder.cls.predictions.decoder if STACK == "bert" else model.decoder.lm_head.decoder


def specials(tok):
    """(start, end, pad) ids: BERT's [CLS]/[SEP]/[PAD] or RoBERTa's <s>/</s>/<pad>."""
    names = ("[CLS]", "[SEP]", "[PAD]") if tok.token_to_id("[CLS]") is not None else ("<s>", "</s>", "<pad>")
    return tuple(tok.token_to_id(n) for n in names)


def stored_keys(model_dir):
    keys = {}
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    files = [f for f in files if os.path.basename(f).startswith("model")]
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                keys[k] = str(h.get_slice(k).get_dtype())
    return keys


def read_pairs(path, n):
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".tsv"):
                src, tgt = line.split("\t")[:2]
            else:
                obj = json.loads(line)
                src, tgt = obj["source"], obj["target"]
            pairs.append((src, tgt))
            if len(pairs) >= n:
                break
    return pairs


def tokenize(src_tok, tgt_tok, pairs, src_special, tgt_special):
    """Sources framed with the encoder tokenizer's specials, targets with the decoder's."""
    srcs = src_tok.encode_batch([p[0] for p in pairs], add_special_tokens=False)
    tgts = tgt_tok.encode_batch([p[1] for p in pairs], add_special_tokens=False)
    (cls, sep, _), (tcls, tsep, _) = src_special, tgt_special
    out = []
    for s, t in zip(srcs, tgts):
        s_ids = [cls] + s.ids[:MAX_SRC_TOKS] + [sep]
        t_ids = t.ids[:MAX_TGT_TOKS]
        out.append((s_ids, [tcls] + t_ids, t_ids + [tsep]))
    return out


def collate(examples, pads):
    src_pad, pad = pads
    B = len(examples)
    S = max(len(e[0]) for e in examples)
    T = max(len(e[1]) for e in examples)
    src = torch.full((B, S), src_pad, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    dec = torch.full((B, T), pad, dtype=torch.long)
    lab = torch.full((B, T), -100, dtype=torch.long)
    for b, (s, d, l) in enumerate(examples):
        src[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        dec[b, : len(d)] = torch.tensor(d)
        lab[b, : len(l)] = torch.tensor(l)
    return src, mask, dec, lab


def run_losses(model, examples, pad, chunk, total_tokens=None):
    """Per-example mean CE (list of floats) and the summed CE. If total_tokens is given, backpropagates
    sum(CE) / total_tokens, i.e. the gradient of the mean CE over all label tokens, chunk by chunk."""
    per_example, ce_sum = [], 0.0
    for i in range(0, len(examples), chunk):
        src, mask, dec, lab = collate(examples[i : i + chunk], pad)
        logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
        V = logits.shape[-1]
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), lab.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(lab.shape)
        n_tok = (lab != -100).sum(dim=1)
        per_example += (tok.sum(dim=1) / n_tok).tolist()
        ce_sum += tok.sum().item()
        if total_tokens is not None:
            (tok.sum() / total_tokens).backward()
    return per_example, ce_sum


def rel_errors(a, b):
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def check_keys(args, model, info, cfg, fails):
    missing = set(info.get("missing_keys") or [])
    unexpected = set(info.get("unexpected_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    errors = info.get("error_msgs") or []
    share = bool(cfg.get("tie_encoder_decoder", False))
    shared = shared_names(model) if share else {}

    ignored = missing & set(LM_ALIASES)
    missing -= set(LM_ALIASES)
    missing_shared = sorted(k for k in missing if k in shared)
    missing -= set(missing_shared)
    log(f"loading info: missing {len(missing) + len(missing_shared)} (+{len(ignored)} tied LM-head aliases ignored), "
        f"unexpected {len(unexpected)}, mismatched {len(mismatched)}, errors {len(errors)}")
    for k in sorted(missing):
        fails.add(f"missing key (transformers initialises it randomly): {k}")
    for k in sorted(unexpected):
        fails.add(f"unexpected key: {k}")
    for k in mismatched:
        fails.add(f"mismatched key: {k}")
    for e in errors:
        fails.add(f"loading error: {e}")
    if missing_shared:
        msg = (f"{len(missing_shared)} shared decoder.{STACK}.* keys are not stored (e.g. {missing_shared[0]}); "
               "transformers 5.x ignores tie_encoder_decoder and would leave them RANDOM")
        if args.allow_missing_shared:
            log(f"WARNING: {msg}; tying them to encoder.* here (--allow-missing-shared)")
        else:
            fails.add(msg + " (store them, or pass --allow-missing-shared)")
    if share:
        sd = model.state_dict()
        bad = [d for d, e in shared.items() if d not in missing_shared and not torch.equal(sd[d], sd[e])]
        for d in bad:
            fails.add(f"bertshare: {d} differs from {shared[d]}")
        log(f"bertshare: {len(shared)} decoder.{STACK}.* tensors shared with encoder.* "
            f"({len(shared) - len(missing_shared) - len(bad)} stored and equal); tying them for the reference")
    return share


def main():
    ap = argparse.ArgumentParser(description="Check a bert2bert model dir against HF transformers.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--score-json")
    ap.add_argument("--grads")
    ap.add_argument("--rtol-loss", type=float, default=1e-4)
    ap.add_argument("--rtol-grad", type=float, default=1e-3)
    ap.add_argument("--atol-keybias", type=float, default=1e-5)
    ap.add_argument("--chunk", type=int, default=16, help="examples per forward pass (memory only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--allow-missing-shared", action="store_true",
                    help="bertshare: accept a file without the shared decoder.bert.* keys")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    fails = Failures()

    cfg_path = os.path.join(args.model, "config.json")
    tok_path = os.path.join(args.model, "tokenizer.json")
    for p in (cfg_path, tok_path, args.data, args.score_json, args.grads):
        if p is None:
            continue
        if not os.path.exists(p):
            log(f"error: {p} not found")
            return 2
    with open(cfg_path) as f:
        cfg = json.load(f)
    global STACK, LM_ALIASES
    STACK, LM_ALIASES = FAMILIES[cfg["decoder"].get("model_type", "bert")]

    # ---- keys -------------------------------------------------------------------------------------------------
    stored = stored_keys(args.model)
    dtypes = {}
    for d in stored.values():
        dtypes[d] = dtypes.get(d, 0) + 1
    log(f"{args.model}: {len(stored)} stored tensors, dtypes {dtypes}")
    model, info = EncoderDecoderModel.from_pretrained(
        args.model, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    share = check_keys(args, model, info, cfg, fails)
    if share:
        tie_shared(model)
    model.eval()  # dropout off

    # ---- tokenizer / config ids -------------------------------------------------------------------------------
    # Two vocabularies: the decoder's tokenizer is decoder_tokenizer.json (targets, the config's special ids).
    tgt_path = os.path.join(args.model, "decoder_tokenizer.json")
    toks = []
    for path in (tok_path, tgt_path if os.path.exists(tgt_path) else tok_path):
        t = Tokenizer.from_file(path)
        t.no_padding()
        t.no_truncation()
        toks.append(t)
    src_tok, tok = toks
    src_special, tgt_special = specials(src_tok), specials(tok)
    cls, sep, pad = tgt_special
    if None in src_special + tgt_special:
        fails.add(f"tokenizer lacks [CLS]/[SEP]/[PAD] (or <s>/</s>/<pad>): {src_special} {tgt_special}")
        return 1
    if cfg.get("decoder_start_token_id") != cls:
        fails.add(f"config decoder_start_token_id {cfg.get('decoder_start_token_id')} != start id {cls}")
    if cfg.get("pad_token_id") != pad:
        fails.add(f"config pad_token_id {cfg.get('pad_token_id')} != pad id {pad}")
    if cfg.get("eos_token_id") != sep:
        log(f"note: config eos_token_id {cfg.get('eos_token_id')} != end id {sep}")
    for t, vocab in ((src_tok, model.config.encoder.vocab_size), (tok, model.config.decoder.vocab_size)):
        if t.get_vocab_size() > vocab:
            fails.add(f"tokenizer vocab {t.get_vocab_size()} > model vocab {vocab}")
    pad = (src_special[2], pad)

    pairs = read_pairs(args.data, args.n)
    if not pairs:
        log(f"error: no pairs in {args.data}")
        return 2
    examples = tokenize(src_tok, tok, pairs, src_special, tgt_special)
    total_tokens = sum(len(e[2]) for e in examples)
    log(f"{len(examples)} pairs from {args.data}: {total_tokens} label tokens, "
        f"src len max {max(len(e[0]) for e in examples)}, tgt len max {max(len(e[2]) for e in examples)}")

    # ---- reference losses -------------------------------------------------------------------------------------
    with torch.no_grad():
        pe32, ce32 = run_losses(model, examples, pad, args.chunk)
    model.double()
    if share:
        tie_shared(model)  # no-op when .double() kept the sharing, which it does; cheap insurance
    assert lm_projection(model).weight is getattr(model.decoder, STACK).embeddings.word_embeddings.weight
    model.zero_grad(set_to_none=True)
    if args.grads:
        pe64, ce64 = run_losses(model, examples, pad, args.chunk, total_tokens=total_tokens)
    else:
        with torch.no_grad():
            pe64, ce64 = run_losses(model, examples, pad, args.chunk)
    mean32, mean64 = ce32 / total_tokens, ce64 / total_tokens
    log(f"reference mean CE over all label tokens: f32 {mean32:.8f}  f64 {mean64:.8f}  "
        f"(mean of per-example: {sum(pe64) / len(pe64):.8f})")
    log("reference per-example loss (f64): " + " ".join(f"{x:.5f}" for x in pe64))
    log(f"f32 reference vs f64 reference: max rel err {max(rel_errors(pe32, pe64)):.2e}")

    # ---- score json -------------------------------------------------------------------------------------------
    if args.score_json:
        with open(args.score_json) as f:
            score = json.load(f)
        got = score.get("per_example_loss")
        if not isinstance(got, list) or len(got) != len(examples):
            fails.add(f"per_example_loss: expected a list of {len(examples)} numbers, got "
                      f"{type(got).__name__} of length {len(got) if isinstance(got, list) else '-'} "
                      f"(run `bert2bert score` on the same first {len(examples)} pairs)")
        else:
            r64, r32 = rel_errors(got, pe64), rel_errors(got, pe32)
            worst = max(range(len(r64)), key=lambda i: r64[i])
            log(f"per_example_loss: max rel err vs f64 ref {r64[worst]:.2e} (example {worst}: got {got[worst]:.7f}, "
                f"ref {pe64[worst]:.7f}); vs f32 ref {max(r32):.2e}; tolerance {args.rtol_loss:g}")
            if not all(math.isfinite(x) for x in got) or r64[worst] > args.rtol_loss:
                fails.add(f"per_example_loss rel err {r64[worst]:.2e} > {args.rtol_loss:g}")
        if "tokens" in score and score["tokens"] != total_tokens:
            fails.add(f"tokens {score['tokens']} != {total_tokens} label tokens (tokenization convention differs)")
        if "mean_loss" in score:
            r = abs(score["mean_loss"] - mean64) / abs(mean64)
            log(f"mean_loss: got {score['mean_loss']:.7f}, ref {mean64:.7f}, rel err {r:.2e}")
            if r > args.rtol_loss:
                hint = ""
                if abs(score["mean_loss"] - sum(pe64) / len(pe64)) / abs(mean64) <= args.rtol_loss:
                    hint = " (it equals the mean of per-example losses; expected the mean over all label tokens)"
                fails.add(f"mean_loss rel err {r:.2e} > {args.rtol_loss:g}{hint}")

    # ---- gradients --------------------------------------------------------------------------------------------
    if args.grads:
        check_grads(args, model, share, fails)

    if fails.items:
        log(f"\nFAILED: {len(fails.items)} problem(s)")
        return 1
    log("\nOK")
    return 0


def check_grads(args, model, share, fails):
    got = load_file(args.grads)
    got = {(k[5:] if k.startswith("grad.") else k): v for k, v in got.items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update({a: params[s] for a, s in LM_ALIASES.items() if a not in params})
    shared = shared_names(model) if share else {}
    rows = []
    for name, g in sorted(got.items()):
        if name not in params:
            fails.add(f"grads: {name} is not a parameter of the model")
            continue
        p = params[name]
        if tuple(g.shape) != tuple(p.shape):
            fails.add(f"grads: {name} shape {tuple(g.shape)} != {tuple(p.shape)}")
            continue
        a = g.double()
        if not torch.isfinite(a).all():
            fails.add(f"grads: {name} has non-finite values")
            continue
        if name.startswith("encoder.pooler."):
            m = a.abs().max().item()
            if m != 0.0:
                fails.add(f"grads: {name} must be absent or zero, max |g| = {m:.3e}")
            continue
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        diff = (a - ref).abs().max().item()
        if name.endswith("attention.self.key.bias"):
            m = a.abs().max().item()
            ok = m < args.atol_keybias
            rows.append((m / args.atol_keybias, name, tuple(p.shape), ref.abs().max().item(), diff, m, "abs", ok))
            if not ok:
                fails.add(f"grads: {name} max |g| {m:.3e} >= {args.atol_keybias:g} (true gradient is zero)")
            continue
        scale = max(ref.abs().max().item(), 1e-6)
        rel = diff / scale
        ok = rel <= args.rtol_grad
        rows.append((rel / args.rtol_grad, name, tuple(p.shape), scale, diff, rel, "rel", ok))
        if not ok:
            fails.add(f"grads: {name} rel err {rel:.3e} > {args.rtol_grad:g}")

    # every trainable tensor must be present (aliases, the pooler and the other name of a shared tensor excepted)
    for name in (n for n, _ in model.named_parameters(remove_duplicate=False)):
        if name in got or name in LM_ALIASES or name.startswith("encoder.pooler."):
            continue
        if name in shared and shared[name] in got:
            continue
        if share and name in set(shared.values()) and any(d in got for d, e in shared.items() if e == name):
            continue
        fails.add(f"grads: no gradient for {name}")

    rows.sort(reverse=True)
    log(f"\ngradients: {len(rows)} tensors compared (rel = max|a-b| / max|ref|, tolerance {args.rtol_grad:g}; "
        f"key biases: max|a| < {args.atol_keybias:g}); worst 10:")
    log(f"{'tensor':<70} {'shape':<14} {'max|ref|':>10} {'max|a-b|':>10} {'err':>10}  ok")
    for _, name, shape, scale, diff, err, kind, ok in rows[:10]:
        log(f"{name:<70} {str(list(shape)):<14} {scale:10.3e} {diff:10.3e} {err:10.3e}{'a' if kind == 'abs' else ' '}"
            f" {'yes' if ok else 'NO'}")
    if shared:
        log("(bertshare: a shared tensor's reference gradient is the sum of its encoder and decoder uses)")


if __name__ == "__main__":
    sys.exit(main())
