#!/usr/bin/env python3
"""All-reduce bandwidth of torch.distributed's gloo backend on loopback, the reference for
worker/examples/allreduce.rs (see run.sh).

One process per rank on 127.0.0.1. Sizes are MiB of fp32 per rank; each timed iteration starts
after a barrier, runs SUM then divides by the world size (the mean, as our all_reduce_avg), and
its time is the slowest rank's; a size reports the median over --iters after one warm-up call,
and the CPU time (user + system, all ranks together) per call.

    python3 bench/allreduce/gloo.py --ranks 2 --sizes 1,4,16,64,256 --iters 10 [--json]
"""

import argparse
import json
import os
import resource
import socket
import sys
import time


def positive_list(text):
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a comma-separated list of integers")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"`{text}`: sizes must be positive")
    return values


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, sizes, iters, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for mib in sizes:
        n = (mib << 20) // 4
        x = (torch.arange(n, dtype=torch.float32) * 7 + rank * 13).remainder(1000) * 1e-3
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(world)
        times = torch.zeros(iters, dtype=torch.float64)
        dist.barrier()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x.div_(world)
            times[i] = time.perf_counter() - t0
        dist.barrier()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = torch.tensor([(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / iters], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
        results.append((mib, n * 4, sorted(times.tolist())[iters // 2], cpu.item()))
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sizes", type=positive_list, default=[1, 4, 16, 64, 256], help="MiB per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", action="store_true", help="one JSON object per size")
    a = p.parse_args()
    if a.ranks < 1 or a.iters < 1:
        p.error("--ranks and --iters must be positive")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, a.ranks, port, a.sizes, a.iters, out)) for r in range(a.ranks)]
    for pr in procs:
        pr.start()
    try:
        results = out.get(timeout=1800)
    except Exception as e:
        print(f"error: no result from rank 0 ({e})", file=sys.stderr)
        results = None
    for pr in procs:
        pr.join(timeout=60)
        if pr.is_alive():
            pr.kill()
    if results is None or any(pr.exitcode != 0 for pr in procs):
        print("error: a gloo rank failed", file=sys.stderr)
        return 1
    if not a.json:
        print(f"{'MiB':>8} {'ranks':>6} {'ms':>10} {'algbw GB/s':>12} {'busbw GB/s':>12} {'cpu ms':>10}")
    for mib, nbytes, secs, cpu in results:
        algbw = nbytes / secs / 1e9
        busbw = algbw * 2 * (a.ranks - 1) / a.ranks
        if a.json:
            print(json.dumps({"impl": "gloo", "ranks": a.ranks, "mib": mib, "bytes": nbytes, "iters": a.iters,
                              "median_s": secs, "algbw_gbs": algbw, "busbw_gbs": busbw, "cpu_s": cpu}))
        else:
            print(f"{mib:>8} {a.ranks:>6} {secs * 1e3:>10.2f} {algbw:>12.3f} {busbw:>12.3f} {cpu * 1e3:>10.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
