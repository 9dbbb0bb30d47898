#!/usr/bin/env bash
# The one script run on the GPU machine (which has no cargo), from the repository root:
#
#   scripts/gpu-check.sh [--quick]
#
# Needs, copied from the build machine (see BENCHMARKS.md, "GPU check"): target/release/bert2bert (a release build),
# scripts/, bench/, and .whl/ holding the pinned NVRTC 13.0.88 (the wheel, or the slim .tar.xz that
# scripts/gpu-pack.sh makes). The GPU machine's own torch may ship a newer NVRTC, whose PTX an older driver rejects,
# so ours goes first on LD_LIBRARY_PATH; cuBLAS, the CUDA runtime and NCCL come from the Python env's nvidia/*/lib.
#
# Stages (each under `timeout`, all within about 7.5 minutes; a failing stage does not stop the later ones):
#   1. bert2bert selftest --device cuda                     every op and a model step against the CPU oracle
#   2. bert2bert bench --device cuda --config bert-base --batch 32 --src-len 128 --tgt-len 128 --steps 10 --json
#   3. scripts/worker-smoke.sh                              a coordinator and one `worker --device cuda` train a tiny
#                                                           job (NCCL unique id relay, world 1, checkpoint commit)
#   4. bench/pytorch_gpu.py --mode eager                    transformers EncoderDecoderModel, bf16 autocast
#   5. bench/pytorch_gpu.py --mode compile                  the same under torch.compile
# then a table: tokens/s ours vs eager vs compile, the ratios, MFU (vs 989 TFLOP/s bf16 dense) and peak memory.
# --quick: the selftest, a small bench of ours (minilm, batch 8, 64+64 tokens, 3 steps) and the worker smoke run.
#
# Environment: OUT (a folder: selftest.txt, every JSON and log, summary.json are saved there), BERT2BERT (the binary,
# default target/release/bert2bert), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the whole run's
# deadline). Exit status: 0 when every stage passed, else 1 (the summary names the failed stages).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root" || exit 2

QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $a" >&2; exit 2 ;;
  esac
done

BIN="${BERT2BERT:-target/release/bert2bert}"
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
deadline=$((SECONDS + BUDGET))
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  work="$OUT"
else
  work="$(mktemp -d /tmp/gpu-check.XXXXXX)"
fi
scratch="$(mktemp -d /tmp/b2b-env.XXXXXX)"
failed=()

say() { printf '\n== %s (%ss elapsed)\n' "$*" "$SECONDS"; }

# A stage's time limit: what it asks for, but never past the deadline.
limit() {
  local want=$1 left=$((deadline - SECONDS))
  if ((left < want)); then echo "$left"; else echo "$want"; fi
}

# run_stage NAME WANT_SECONDS CMD...: runs CMD under timeout; records NAME as failed on a non-zero exit.
run_stage() {
  local name=$1 want=$2
  shift 2
  local t
  t=$(limit "$want")
  if ((t < 15)); then
    echo "gpu-check: no time left for $name; skipped"
    failed+=("$name (skipped: no time)")
    return 1
  fi
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "gpu-check: $name timed out after ${t}s"
    failed+=("$name (timeout ${t}s)")
  elif ((rc != 0)); then
    echo "gpu-check: $name failed (exit $rc)"
    failed+=("$name (exit $rc)")
  fi
  return $rc
}

# ---- environment: our NVRTC first, then the Python env's CUDA libraries ----
say "environment"
cu13=/tmp/b2b-cu13
shopt -s nullglob
wheels=(.whl/*.whl)
tars=(.whl/*.tar.xz .whl/*.tar.gz .whl/*.tgz)
shopt -u nullglob
if ((${#wheels[@]} + ${#tars[@]} > 0)); then
  rm -rf "$cu13"
  mkdir -p "$cu13"
  if ((${#wheels[@]} > 0)); then
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
      --target "$cu13" "${wheels[@]}" || echo "gpu-check: pip could not install ${wheels[*]}"
  fi
  for t in "${tars[@]}"; do
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$t" "$cu13" ||
      echo "gpu-check: could not unpack $t"
  done
else
  echo "gpu-check: no .whl/ here: using whatever NVRTC the system and the Python env have"
fi
nvrtc=$(find "$cu13" -name 'libnvrtc.so*' ! -name '*builtins*' ! -name '*.alt.*' 2>/dev/null | sort | head -n 1)
ld=()
inc=()
if [[ -n "$nvrtc" ]]; then
  nvlib=$(dirname "$nvrtc")
  # cudarc tries the unversioned name first: without this link a system libnvrtc.so would win.
  [[ -e "$nvlib/libnvrtc.so" ]] || ln -s "$(basename "$nvrtc")" "$nvlib/libnvrtc.so"
  ld+=("$nvlib")
  echo "NVRTC: $nvrtc"
fi
h=$(find "$cu13" -name cuda_bf16.h 2>/dev/null | head -n 1)
[[ -n "$h" ]] && inc+=("$(dirname "$h")")
h=$(find "$cu13" -name nvrtc.h 2>/dev/null | head -n 1)
[[ -n "$h" && ! " ${inc[*]} " == *" $(dirname "$h") "* ]] && inc+=("$(dirname "$h")")

# The Python env's nvidia/*/lib (cuBLAS, cuBLASLt, CUDA runtime, NCCL) and headers, after ours.
mapfile -t pylibs < <("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    import site
    roots = [os.path.join(p, "nvidia") for p in site.getsitepackages()]
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        print(d)
    for d in sorted(glob.glob(os.path.join(r, "*", "include"))):
        if os.path.exists(os.path.join(d, "cuda_bf16.h")):
            print("include:" + d)
EOF
)
for d in "${pylibs[@]}"; do
  case "$d" in
    include:*) inc+=("${d#include:}") ;;
    *) ld+=("$d") ;;
  esac
done
# cudarc opens libnccl.so, which the NCCL wheel ships only as libnccl.so.2.
nccl=$(for d in "${ld[@]}"; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n 1)
if [[ -n "$nccl" ]]; then
  mkdir -p "$scratch/lib"
  ln -sf "$nccl" "$scratch/lib/libnccl.so"
  ld+=("$scratch/lib")
fi
if ((${#ld[@]} > 0)); then
  LD_LIBRARY_PATH="$(IFS=:; echo "${ld[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
fi
BERT2BERT_CUDA_INCLUDE="$(IFS=:; echo "${inc[*]}")"
export BERT2BERT_CUDA_INCLUDE
# A fresh PTX cache: its key does not include the NVRTC version.
export BERT2BERT_CACHE="$scratch/ptx"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BERT2BERT_LOG="${BERT2BERT_LOG:-info}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
echo "BERT2BERT_CUDA_INCLUDE=$BERT2BERT_CUDA_INCLUDE"

say "GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm,power.limit \
  --format=csv 2>&1 || echo "gpu-check: nvidia-smi failed"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
  2>&1 || echo "gpu-check: no torch in $PYTHON"

have_bin=1
if [[ ! -f "$BIN" ]]; then
  echo "gpu-check: $BIN not found: build it with cargo build --release and copy it here"
  failed+=("bert2bert binary missing")
  have_bin=0
else
  [[ -x "$BIN" ]] || chmod +x "$BIN" 2>/dev/null
  if ! "$BIN" --version; then
    echo "gpu-check: $BIN does not start here (glibc or architecture mismatch?)"
    failed+=("bert2bert does not start")
    have_bin=0
  fi
fi

# ---- 1. selftest ----
if ((have_bin)); then
  say "selftest: bert2bert selftest --device cuda"
  # Output to files (a pipeline would run the stage in a subshell and lose its failure), shown after.
  run_stage selftest 120 "$BIN" selftest --device cuda >"$work/selftest.txt" 2>"$work/selftest.log"
  cat "$work/selftest.txt"
  tail -n 20 "$work/selftest.log"
fi

# ---- 2. our bench ----
if ((QUICK)); then
  bench_args=(--config minilm --batch 8 --src-len 64 --tgt-len 64 --steps 3 --warmup 1)
else
  bench_args=(--config bert-base --batch 32 --src-len 128 --tgt-len 128 --steps 10 --warmup 2)
fi
if ((have_bin)); then
  say "bench: bert2bert bench --device cuda ${bench_args[*]} --json"
  run_stage "bench bert2bert" 120 "$BIN" bench --device cuda "${bench_args[@]}" --json \
    >"$work/bench_bert2bert.json" 2>"$work/bench_bert2bert.log"
  tail -n 20 "$work/bench_bert2bert.log"
  cat "$work/bench_bert2bert.json"
fi

# ---- 3. a CUDA worker through the coordinator ----
say "worker smoke: scripts/worker-smoke.sh (coordinator + one cuda worker, tiny job, NCCL world 1)"
run_stage "worker smoke" 90 env BERT2BERT="$BIN" PYTHON="$PYTHON" DEVICE=cuda scripts/worker-smoke.sh \
  "$work/worker-smoke" >"$work/worker-smoke.txt" 2>&1
tail -n 20 "$work/worker-smoke.txt"

# ---- 4, 5. PyTorch ----
if ((!QUICK)); then
  py_args=(--batch 32 --src-len 128 --tgt-len 128 --steps 10 --warmup 3 --json)
  say "pytorch eager: bench/pytorch_gpu.py --mode eager ${py_args[*]}"
  run_stage "pytorch eager" 110 "$PYTHON" bench/pytorch_gpu.py --mode eager "${py_args[@]}" \
    >"$work/bench_pytorch_eager.json" 2>"$work/bench_pytorch_eager.log"
  tail -n 8 "$work/bench_pytorch_eager.log"
  say "pytorch compile: bench/pytorch_gpu.py --mode compile ${py_args[*]}"
  run_stage "pytorch compile" 240 "$PYTHON" bench/pytorch_gpu.py --mode compile --compile-warmup 3 "${py_args[@]}" \
    >"$work/bench_pytorch_compile.json" 2>"$work/bench_pytorch_compile.log"
  tail -n 8 "$work/bench_pytorch_compile.log"
fi

# ---- summary ----
say "summary"
printf '%s\n' "${failed[@]}" >"$work/failed.txt"
"$PYTHON" - "$work" <<'EOF'
import json, os, re, sys

work = sys.argv[1]


def load(name):
    p = os.path.join(work, name)
    try:
        text = open(p).read()
    except OSError:
        return None
    for line in reversed(text.splitlines()):  # the contract is one JSON object; take the last that parses
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def num(d, k):
    v = (d or {}).get(k)
    return v if isinstance(v, (int, float)) else None


selftest = "not run"
try:
    text = open(os.path.join(work, "selftest.txt")).read()
    m = re.search(r"(\d+) checks, (\d+) failed", text)
    if m:
        selftest = f"{m.group(1)} checks, {m.group(2)} failed"
    else:
        selftest = "no result (see selftest.log)"
except OSError:
    pass

rows = [("bert2bert", load("bench_bert2bert.json")),
        ("pytorch eager", load("bench_pytorch_eager.json")),
        ("pytorch compile", load("bench_pytorch_compile.json"))]
ours = num(rows[0][1], "tokens_per_s")
gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
fmt = lambda v, f: f.format(v) if v is not None else "-"
print(f"selftest: {selftest}")
smoke = "not run"
try:
    lines = [l for l in open(os.path.join(work, "worker-smoke.txt")).read().splitlines() if l.startswith("worker-smoke: ")]
    smoke = lines[-1][len("worker-smoke: "):] if lines else "no result (see worker-smoke.txt)"
except OSError:
    pass
print(f"cuda worker smoke: {smoke}")
d0 = next((d for _, d in rows if d), {}) or {}
print(f"device: {d0.get('device', '?')}; batch {d0.get('batch', '?')}, src {d0.get('src_len', '?')}, "
      f"tgt {d0.get('tgt_len', '?')}; MFU against 989 TFLOP/s (bf16 dense)")
head = f"{'':<16} {'step ms':>9} {'tokens/s':>10} {'ours/this':>9} {'MFU':>7} {'peak GiB':>9} {'alloc GiB':>9}"
print(head)
print("-" * len(head))
summary = {"selftest": selftest, "worker_smoke": smoke, "results": {}}
for name, d in rows:
    tps = num(d, "tokens_per_s")
    ratio = ours / tps if ours and tps else None
    mfu = num(d, "mfu")
    print(f"{name:<16} {fmt(num(d, 'step_ms_median'), '{:.1f}'):>9} {fmt(tps, '{:.0f}'):>10} "
          f"{fmt(ratio, '{:.2f}x'):>9} {fmt(mfu and 100 * mfu, '{:.1f}%'):>7} "
          f"{gib(num(d, 'peak_device_bytes')):>9} {gib(num(d, 'max_memory_allocated')):>9}")
    summary["results"][name] = {"tokens_per_s": tps, "step_ms_median": num(d, "step_ms_median"),
                                "ours_over_this": ratio, "mfu": mfu,
                                "peak_device_bytes": num(d, "peak_device_bytes"),
                                "max_memory_allocated": num(d, "max_memory_allocated")}
print("peak GiB: device memory in use (total - free, sampled at step ends, CUDA context included);")
print("alloc GiB: torch.cuda.max_memory_allocated (tensors only); ours/this: bert2bert tokens/s over that row's (> 1: ours faster)")
failed = [l for l in open(os.path.join(work, "failed.txt")).read().splitlines() if l.strip()]
summary["failed_stages"] = failed
with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
EOF
echo "files: $work"
rm -rf "$scratch"
if ((${#failed[@]} > 0)); then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
