#!/usr/bin/env bash
# Our ring all-reduce (worker/examples/allreduce.rs) against torch.distributed gloo on loopback,
# side by side, both with one process per rank on 127.0.0.1. Both run ROUNDS times, alternating,
# and each size keeps its best round (the median of ITERS timed calls within a round), so a burst
# of other load on the machine does not decide the comparison. "cpu ms" is the user + system CPU
# time per call of all ranks together (the lowest round's): on loopback the collective is CPU
# work, and CPU time varies much less than wall time when the machine is busy.
#
#   bench/allreduce/run.sh [--ranks 2] [--sizes 1,4,16,64,256] [--iters 10] [--rounds 3]
#
# Needs python3 with torch (gloo); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."

ranks=2 sizes=1,4,16,64,256 iters=10 rounds=3
while [ $# -gt 0 ]; do
    case "$1" in
        --ranks) ranks=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --iters) iters=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) echo "usage: $0 [--ranks N] [--sizes MIB,..] [--iters N] [--rounds N]" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
if ! "$python" -c "import torch.distributed as d; assert d.is_gloo_available()" 2>/dev/null; then
    echo "error: $python has no torch with gloo (set PYTHON)" >&2
    exit 1
fi
cargo build --release --quiet -p worker --example allreduce
ours=target/release/examples/allreduce

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
    echo "round $r/$rounds: ring" >&2
    "$ours" --ranks "$ranks" --sizes "$sizes" --iters "$iters" --json >>"$out"
    echo "round $r/$rounds: gloo" >&2
    "$python" bench/allreduce/gloo.py --ranks "$ranks" --sizes "$sizes" --iters "$iters" --json >>"$out"
done

echo "$(date -u +%Y-%m-%dT%H:%MZ) $(uname -n), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
    "$ranks rank processes on 127.0.0.1, best of $rounds rounds x median of $iters"
"$python" - "$out" <<'EOF'
import json, sys
best, cpu = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["impl"], r["mib"])
    if key not in best or r["median_s"] < best[key]["median_s"]:
        best[key] = r
    cpu[key] = min(cpu.get(key, float("inf")), r["cpu_s"])
sizes = sorted({mib for _, mib in best})
print("| MiB | ring ms | ring algbw GB/s | ring busbw GB/s | gloo ms | gloo algbw GB/s | gloo busbw GB/s "
      "| ring / gloo (speed) | ring cpu ms | gloo cpu ms |")
print("|----:|--------:|----------------:|----------------:|--------:|----------------:|----------------:"
      "|----:|----:|----:|")
for mib in sizes:
    o, g = best[("ring", mib)], best[("gloo", mib)]
    print(f"| {mib} | {o['median_s'] * 1e3:.2f} | {o['algbw_gbs']:.3f} | {o['busbw_gbs']:.3f} "
          f"| {g['median_s'] * 1e3:.2f} | {g['algbw_gbs']:.3f} | {g['busbw_gbs']:.3f} "
          f"| {o['algbw_gbs'] / g['algbw_gbs']:.2f} | {cpu[('ring', mib)] * 1e3:.1f} | {cpu[('gloo', mib)] * 1e3:.1f} |")
EOF
