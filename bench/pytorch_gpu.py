#!/usr/bin/env python3
"""PyTorch side of the GPU training benchmark (`bert2bert bench --device cuda` is compared against it).

    python3 bench/pytorch_gpu.py --batch 32 --src-len 128 --tgt-len 128 --steps 10 --warmup 3 \
        --mode eager|compile|both [--json]

Builds a randomly initialised bert-base-sized transformers EncoderDecoderModel from configs (no downloads: it works
offline): BertConfig(vocab 30522, hidden 768, 12 layers, 12 heads, intermediate 3072, max positions 512) for the
encoder, the same with is_decoder=True and add_cross_attention=True for the decoder; the LM head is tied to the
decoder word embeddings, as in ours. `--config tiny` is a 2-layer, hidden-64 model for smoke tests (also with
`--device cpu`).

One step, as `bert2bert bench` does it: forward with labels (transformers' own loss, mean cross-entropy over all
label tokens) under bf16 autocast (fp32 master weights, bf16 matmuls), backward, AdamW step (lr 5e-5, weight decay
0.01, none on biases and LayerNorm weights, fused when available), zero_grad. Model in train mode (dropout on). The
synthetic batch is full length with no padding (same construction as bench.rs and pytorch_cpu.py):
    input_ids          [B,S] = [CLS] random ids in [1000, vocab) [SEP]
    labels             [B,T] = random ids ... [SEP]
    decoder_input_ids  [B,T] = labels shifted right, starting with decoder_start ([CLS])
Each step ends with torch.cuda.synchronize(). Reports the median step time over the timed steps, tokens/s =
B*(S+T)/median, peak memory (torch.cuda.max_memory_allocated, and total-minus-free device memory sampled at the
end of each step, the number `bert2bert bench` reports as peak_device_bytes), and MFU = model FLOPs per step /
step time / 989e12 (H100/H200 bf16 dense peak).

Model FLOPs per step (the same formula as `step_flops` in cli/src/bench.rs), for hidden C, intermediate I,
encoder/decoder layers Le/Ld, vocab V, batch B, source S, target T, label rows M (= B*T here):
    6 * [ B*S*Le*(4C^2 + 2CI) + Ld*(B*T*(6C^2 + 2CI) + B*S*2C^2) + M*(C^2 + CV) ]     every Linear: 2 fwd + 4 bwd
  + 12 * C * B * [ Le*S^2 + Ld*(T^2 + T*S) ]                                          attention QK^T and PV, fwd+bwd
(causal attention counted in full; embeddings, norms, softmax, loss and AdamW not counted).

torch.compile mode compiles the model (not the optimizer) with the default backend (inductor) and warms up more
steps (--compile-warmup) so compilation of forward and backward is not timed.
Logs go to stderr; --json prints one JSON object on stdout (for --mode both: {"eager": {...}, "compile": {...}}).
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

# Offline: the model is built from configs; nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel  # noqa: E402

CLS, SEP, PAD = 101, 102, 0
H100_BF16_DENSE = 989e12

CONFIGS = {
    # hidden, layers, heads, intermediate, vocab
    "bert-base": (768, 12, 12, 3072, 30522),
    "minilm": (384, 6, 12, 1536, 30522),
    "tiny": (64, 2, 4, 128, 30522),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def step_flops(hidden, layers, inter, vocab, B, S, T, M):
    """Model FLOPs of one training step; keep in sync with step_flops in cli/src/bench.rs."""
    C, I, L, V = float(hidden), float(inter), float(layers), float(vocab)
    linear = (B * S * L * (4 * C * C + 2 * C * I)
              + L * (B * T * (6 * C * C + 2 * C * I) + B * S * 2 * C * C)
              + M * (C * C + C * V))
    attention = B * (L * S * S * C + L * (T * T + T * S) * C)
    return 6 * linear + 12 * attention


def make_batch(B, S, T, vocab, seed, device):
    g = torch.Generator().manual_seed(seed)
    lo = 1000 if vocab > 2000 else vocab // 4
    src = torch.randint(lo, vocab, (B, S), generator=g)
    src[:, 0] = CLS
    src[:, -1] = SEP
    labels = torch.randint(lo, vocab, (B, T), generator=g)
    labels[:, -1] = SEP
    dec = torch.empty_like(labels)
    dec[:, 0] = CLS
    dec[:, 1:] = labels[:, :-1]
    return [t.to(device) for t in (src, torch.ones_like(src), dec, labels)]


def build_model(name, device):
    hidden, layers, heads, inter, vocab = CONFIGS[name]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter, max_position_embeddings=512, type_vocab_size=2, pad_token_id=PAD)
    enc = BertConfig(**common)
    dec = BertConfig(**common, is_decoder=True, add_cross_attention=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id = CLS
    config.pad_token_id = PAD
    config.eos_token_id = SEP
    model = EncoderDecoderModel(config=config).to(device)
    model.train()  # dropout on, as in training
    return model


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # each tied tensor once
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, device):
    groups = param_groups(model, 0.01)
    kw = dict(lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), True
        except (TypeError, RuntimeError) as e:  # older torch
            log(f"fused AdamW unavailable ({e}); using the default implementation")
    return torch.optim.AdamW(groups, **kw), False


def device_used_bytes(device):
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, args, device):
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_model(args.config, device)
    hidden, layers, heads, inter, vocab = CONFIGS[args.config]
    n_params = sum(p.numel() for p in model.parameters())
    opt, fused = make_optimizer(model, device)
    fwd = torch.compile(model) if mode == "compile" else model
    src, mask, dec, labels = make_batch(args.batch, args.src_len, args.tgt_len, vocab, args.seed, device)
    log(f"[{mode}] built model in {time.perf_counter() - t0:.1f}s: {n_params / 1e6:.1f}M parameters, "
        f"attention {model.config.encoder._attn_implementation}, fused AdamW {fused}")
    warmup = args.warmup + (args.compile_warmup if mode == "compile" else 0)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=not args.fp32)
    times, losses, peak_used = [], [], device_used_bytes(device)
    t_first = None
    for step in range(warmup + args.steps):
        t = time.perf_counter()
        with amp:
            out = fwd(input_ids=src, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t
        if t_first is None:
            t_first = dt
        used = device_used_bytes(device)
        if used is not None:
            peak_used = max(peak_used or 0, used)
        loss = out.loss.item()
        losses.append(loss)
        timed = step >= warmup
        if timed:
            times.append(dt)
        log(f"[{mode}] step {step}{'' if timed else ' (warmup)'}: {dt * 1000:.1f} ms, loss {loss:.4f}")
    med = statistics.median(times)
    tokens = args.batch * (args.src_len + args.tgt_len)
    flops = step_flops(hidden, layers, inter, vocab, args.batch, args.src_len, args.tgt_len,
                       args.batch * args.tgt_len)
    result = {
        "impl": f"pytorch-{mode}",
        "mode": mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "steps": args.steps,
        "warmup": warmup,
        "autocast": None if args.fp32 else "bf16",
        "fused_adamw": fused,
        "first_step_ms": t_first * 1000,
        "step_ms_median": med * 1000,
        "step_ms_all": [round(x * 1000, 3) for x in times],
        "tokens_per_s": tokens / med,
        "flops_per_step": flops,
        "achieved_flops": flops / med,
        "peak_flops": H100_BF16_DENSE if device.type == "cuda" else None,
        "mfu": flops / med / H100_BF16_DENSE if device.type == "cuda" else None,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "max_memory_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "peak_device_bytes": peak_used,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "params": n_params,
    }
    mfu = f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else ""
    log(f"[{mode}] median step {med * 1000:.1f} ms, {tokens / med:.0f} tokens/s{mfu}")
    del fwd, model, opt, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser(description="PyTorch GPU bert2bert training-step benchmark (bf16 autocast)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="bert-base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src-len", type=int, default=128)
    ap.add_argument("--tgt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    ap.add_argument("--compile-warmup", type=int, default=3, help="extra untimed steps in compile mode")
    ap.add_argument("--mode", choices=["eager", "compile", "both"], default="eager")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: smoke tests only)")
    ap.add_argument("--fp32", action="store_true", help="no autocast (fp32 matmuls)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.src_len < 2 or args.tgt_len < 2 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("need --src-len >= 2, --tgt-len >= 2, --batch >= 1, --steps >= 1, --warmup >= 0")
    if max(args.src_len, args.tgt_len) > 512:
        ap.error("lengths are limited to 512 positions")
    warnings.filterwarnings("ignore", category=FutureWarning)  # EncoderDecoderModel warns on every labels forward
    warnings.filterwarnings("ignore", category=UserWarning)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            log("error: torch sees no CUDA device")
            sys.exit(2)
        torch.cuda.set_device(device)
        # Matmuls in fp32 mode (--fp32) may use TF32 as PyTorch users usually allow; autocast runs bf16 anyway.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}")
    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    results = {m: run_mode(m, args, device) for m in modes}
    out = results if args.mode == "both" else results[args.mode]
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        for m, r in results.items():
            print(f"== {m} ==")
            for k, v in r.items():
                print(f"{k}: {v}")


if __name__ == "__main__":
    main()
