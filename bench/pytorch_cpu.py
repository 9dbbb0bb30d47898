#!/usr/bin/env python3
"""PyTorch side of the CPU training benchmark (the reference `bert2bert bench --device cpu` is compared against).

    python3 bench/pytorch_cpu.py --model DIR --batch 16 --src-len 64 --tgt-len 64 --steps 5 --warmup 1 \
        --threads 2 [--json]

DIR is a `bert2bert init` output (HF EncoderDecoderModel layout). One step = forward with labels (transformers'
own loss: mean cross-entropy over all label tokens), backward, AdamW step (lr 5e-5, weight decay 0.01, none on
biases and LayerNorm weights), zero_grad. Model in train mode (dropout on), fp32. The synthetic batch is fixed
(seeded), full length, no padding:
    input_ids          [B,S] = [CLS] random ids in [1000, vocab) [SEP]
    labels             [B,T] = random ids ... [SEP]
    decoder_input_ids  [B,T] = labels shifted right, starting with decoder_start ([CLS])
Reports the median step time over the timed steps, tokens/s = B*(S+T)/median, and the peak RSS of this process.
Logs go to stderr; --json prints one JSON object on stdout.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

import torch
from transformers import EncoderDecoderModel

CLS, SEP = 101, 102


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def make_batch(B, S, T, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1000, vocab, (B, S), generator=g)
    src[:, 0] = CLS
    src[:, -1] = SEP
    labels = torch.randint(1000, vocab, (B, T), generator=g)
    labels[:, -1] = SEP
    dec = torch.empty_like(labels)
    dec[:, 0] = CLS
    dec[:, 1:] = labels[:, :-1]
    return src, torch.ones_like(src), dec, labels


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # each tied tensor once
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def main():
    ap = argparse.ArgumentParser(description="PyTorch CPU bert2bert training-step benchmark")
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--src-len", type=int, default=64)
    ap.add_argument("--tgt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.src_len < 2 or args.tgt_len < 1 or args.batch < 1 or args.steps < 1:
        ap.error("need --src-len >= 2, --tgt-len >= 1, --batch >= 1, --steps >= 1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # EncoderDecoderModel warns on every labels forward

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = EncoderDecoderModel.from_pretrained(args.model, dtype=torch.float32)
    model.train()  # dropout on, as in training; from_pretrained returns eval mode
    vocab = model.config.decoder.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s: {n_params / 1e6:.2f}M parameters, vocab {vocab}, "
        f"attention {model.config.encoder._attn_implementation}")
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, mkl {torch.backends.mkl.is_available()}, "
        f"mkldnn {torch.backends.mkldnn.is_available()}")

    src, mask, dec, labels = make_batch(args.batch, args.src_len, args.tgt_len, vocab, args.seed)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=5e-5, betas=(0.9, 0.999), eps=1e-8)

    times, parts, losses = [], [], []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = model(input_ids=src, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        t_fwd = time.perf_counter()
        out.loss.backward()
        t_bwd = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        dt = t_end - t
        loss = out.loss.item()
        timed = step >= args.warmup
        if timed:
            times.append(dt)
            parts.append((t_fwd - t, t_bwd - t_fwd, t_end - t_bwd))
        losses.append(loss)
        log(f"step {step}{'' if timed else ' (warmup)'}: {dt * 1000:.1f} ms (fwd {(t_fwd - t) * 1000:.0f}, "
            f"bwd {(t_bwd - t_fwd) * 1000:.0f}, adamw {(t_end - t_bwd) * 1000:.0f}), loss {loss:.4f}")

    med = statistics.median(times)
    tokens = args.batch * (args.src_len + args.tgt_len)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {
        "impl": "pytorch",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_ms_median": med * 1000,
        "step_ms_all": [round(x * 1000, 3) for x in times],
        "fwd_ms_median": statistics.median(p[0] for p in parts) * 1000,
        "bwd_ms_median": statistics.median(p[1] for p in parts) * 1000,
        "adamw_ms_median": statistics.median(p[2] for p in parts) * 1000,
        "tokens_per_s": tokens / med,
        "peak_rss_bytes": peak_rss,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "params": n_params,
        "cpu": platform.processor() or platform.machine(),
    }
    log(f"median step {med * 1000:.1f} ms, {tokens / med:.0f} tokens/s, peak RSS {peak_rss / 2**30:.2f} GiB")
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
