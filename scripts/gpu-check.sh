#!/usr/bin/env bash
# The one script run on the GPU machine (which has no cargo), from the repository root:
#
#   scripts/gpu-check.sh [--quick] [--emu]
#
# Needs, copied from the build machine (see BENCHMARKS.md, "GPU check"): target/release/bert2bert (a release build),
# scripts/, bench/, and .whl/ holding the pinned NVRTC 13.0.88 (the wheel, or the slim .tar.xz that
# scripts/gpu-pack.sh makes; without .whl/, .deps/cuda13 from scripts/setup_nvrtc.sh). The GPU machine's torch may
# ship a newer NVRTC, whose PTX an older driver rejects, so ours goes first on our commands' LD_LIBRARY_PATH; cuBLAS,
# the CUDA runtime and NCCL come from the Python env's nvidia/*/lib. That LD_LIBRARY_PATH, BERT2BERT_CUDA_INCLUDE,
# BERT2BERT_CACHE and NCCL_DEBUG=WARN are set only on our commands (bert2bert, and bert2bert inside
# worker-smoke.sh): python and PyTorch run with the caller's environment and keep their own libraries.
#
# Stages, in this order, each under `timeout` against one deadline (GPU_CHECK_BUDGET_S, default 300 s, which leaves
# time to rerun within a 15-minute GPU session); a failing stage does not stop the later ones:
#   1. bert2bert selftest --device cuda, then again with --precision bf16   every op and a model step vs the CPU
#   2. scripts/worker-smoke.sh        a coordinator and one `worker --device cuda` train a tiny job (NCCL unique id
#                                     relay, world 1, checkpoint commit); its coordinator/worker logs stay in OUT
#   3. bert2bert bench --device cuda --config bert-base --batch 32 --src-len 128 --tgt-len 128 --steps 10 --json,
#      then the same shape with --predict h100: the cost model's per-kernel table, predicted beside measured
#   4. bench/pytorch_gpu.py --mode eager     transformers EncoderDecoderModel, bf16 autocast
#   5. bench/pytorch_gpu.py --mode compile   the same under torch.compile, only when >= 150 s are left (else listed
#                                            as skipped for time, which is not a failure)
# then the stage times and a table: tokens/s ours vs eager vs compile, the ratios, MFU (vs 989 TFLOP/s bf16 dense)
# and peak memory; for a failed stage, the tail of its logs and their NCCL lines.
# --quick: stages 1-2 and a small bench of ours (minilm, batch 8, 64+64 tokens, 3 steps); no PyTorch.
# --emu (or DEVICE=cuda-emu): a rehearsal without a GPU: our stages run on --device cuda-emu (the virtual GPU: the
# same CUDA backend, kernels compiled by NVRTC), the bench is tiny (minilm, batch 2, 16+16 tokens, 2 steps),
# nvidia-smi and PyTorch are skipped (no GPU). The binary defaults to target/debug/bert2bert when there is no release one.
#
# Environment: OUT (a folder: every table, JSON and log, summary.json are saved there), BERT2BERT (the binary,
# default target/release/bert2bert), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 300: the whole run's
# deadline), DEVICE (cuda, or cuda-emu = --emu). Exit status: 0 when every stage that ran passed and none was cut
# for time (a skipped torch.compile stage excepted), else 1 (the summary names the failed stages).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root" || exit 2

QUICK=0
EMU=0
case "${DEVICE:-cuda}" in
  cuda) ;;
  cuda-emu) EMU=1 ;;
  *) echo "gpu-check: DEVICE must be cuda or cuda-emu, not ${DEVICE}" >&2; exit 2 ;;
esac
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --emu) EMU=1 ;;
    -h|--help) sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $a" >&2; exit 2 ;;
  esac
done
dev=cuda
((EMU)) && dev=cuda-emu

BIN="${BERT2BERT:-target/release/bert2bert}"
if ((EMU)) && [[ -z "${BERT2BERT:-}" && ! -f "$BIN" && -f target/debug/bert2bert ]]; then
  BIN=target/debug/bert2bert
fi
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-300}"
COMPILE_MIN_S=150
deadline=$((SECONDS + BUDGET))
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  work="$(cd "$OUT" && pwd)"
else
  work="$(mktemp -d /tmp/gpu-check.XXXXXX)"
fi
scratch="$(mktemp -d /tmp/b2b-env.XXXXXX)"
failed=()   # stages that failed, timed out or had no time left: exit status 1
skipped=()  # stages not run by design (--quick, --emu, torch.compile short of time): listed, not failures
# A rerun into the same OUT must not show the last run's results for a stage it skips.
rm -rf "$work"/selftest{,_bf16}.{txt,log} "$work"/bench_{bert2bert,pytorch_eager,pytorch_compile}.{json,log} \
  "$work"/bench_predict.{txt,log} "$work/worker-smoke.txt" "$work/worker-smoke" "$work"/{summary.json,failed.txt,skipped.txt}
: >"$work/stages.tsv"

say() { printf '\n== %s (%ss elapsed)\n' "$*" "$SECONDS"; }

# A stage's time limit: what it asks for, but never past the deadline.
limit() {
  local want=$1 left=$((deadline - SECONDS))
  if ((left < want)); then echo "$left"; else echo "$want"; fi
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$work/stages.tsv"; }

skip() {
  skipped+=("$1 ($2)")
  record "$1" "skipped: $2" 0
  echo "gpu-check: $1 skipped: $2"
}

# run_stage NAME WANT_SECONDS STDOUT_FILE STDERR_FILE CMD...: runs CMD under timeout, its output to the files
# (STDERR_FILE "-": both to STDOUT_FILE); records NAME's result and time; NAME is failed on a non-zero exit.
run_stage() {
  local name=$1 want=$2 out=$3 err=$4
  shift 4
  local t t0=$SECONDS rc
  t=$(limit "$want")
  if ((t < 15)); then
    echo "gpu-check: no time left for $name; skipped"
    failed+=("$name (skipped: no time)")
    record "$name" "no time left" 0
    return 1
  fi
  if [[ "$err" == - ]]; then
    timeout --kill-after=10 "$t" "$@" >"$out" 2>&1
  else
    timeout --kill-after=10 "$t" "$@" >"$out" 2>"$err"
  fi
  rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then
    echo "gpu-check: $name timed out after ${t}s"
    failed+=("$name (timeout ${t}s)")
    status="timeout ${t}s"
  elif ((rc != 0)); then
    echo "gpu-check: $name failed (exit $rc)"
    failed+=("$name (exit $rc)")
    status="exit $rc"
  fi
  record "$name" "$status" $((SECONDS - t0))
  return $rc
}

# The logs of a stage, shown (tail and NCCL lines) when it fails.
stage_logs() {
  case "$1" in
    "selftest fp32") echo "$work/selftest.log" ;;
    "selftest bf16") echo "$work/selftest_bf16.log" ;;
    "worker smoke") printf '%s\n' "$work/worker-smoke.txt" "$work/worker-smoke/worker.log" \
      "$work/worker-smoke/coordinator.log" ;;
    "bench bert2bert") echo "$work/bench_bert2bert.log" ;;
    "bench predict") echo "$work/bench_predict.log" ;;
    "pytorch eager") echo "$work/bench_pytorch_eager.log" ;;
    "pytorch compile") echo "$work/bench_pytorch_compile.log" ;;
  esac
}

# ---- environment for our commands: our NVRTC first, then the Python env's CUDA libraries ----
say "environment (device $dev)"
cu13=/tmp/b2b-cu13
shopt -s nullglob
wheels=(.whl/*.whl)
tars=(.whl/*.tar.xz .whl/*.tar.gz .whl/*.tgz)
shopt -u nullglob
nvroot=
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
  nvroot=$cu13
elif [[ -d .deps/cuda13 ]]; then
  echo "gpu-check: no .whl/ here: using .deps/cuda13 (scripts/setup_nvrtc.sh)"
  nvroot="$root/.deps/cuda13"
else
  echo "gpu-check: no .whl/ or .deps/cuda13 here: using whatever NVRTC the system and the Python env have"
fi
ld=()
inc=()
mkdir -p "$scratch/lib"
if [[ -n "$nvroot" ]]; then
  nvrtc=$(find "$nvroot" -name 'libnvrtc.so.*' ! -name '*builtins*' ! -name '*.alt.*' 2>/dev/null | sort | head -n 1)
  if [[ -n "$nvrtc" ]]; then
    # cudarc tries the unversioned name first: without this link (first on the path) a system libnvrtc.so would win.
    ln -sf "$nvrtc" "$scratch/lib/libnvrtc.so"
    ld+=("$scratch/lib" "$(dirname "$nvrtc")")
    echo "NVRTC: $nvrtc"
  fi
  h=$(find "$nvroot" -name cuda_bf16.h 2>/dev/null | head -n 1)
  [[ -n "$h" ]] && inc+=("$(dirname "$h")")
  h=$(find "$nvroot" -name nvrtc.h 2>/dev/null | head -n 1)
  [[ -n "$h" && ! " ${inc[*]} " == *" $(dirname "$h") "* ]] && inc+=("$(dirname "$h")")
fi

# The Python env's nvidia/*/lib (cuBLAS, cuBLASLt, CUDA runtime, NCCL) and headers, after ours. The virtual GPU
# carries its own cuBLAS and NCCL.
pylibs=()
if ((!EMU)); then
  mapfile -t pylibs < <(timeout 60 "$PYTHON" - <<'EOF' 2>/dev/null
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
fi
for d in "${pylibs[@]}"; do
  case "$d" in
    include:*) inc+=("${d#include:}") ;;
    *) ld+=("$d") ;;
  esac
done
# cudarc opens libnccl.so, which the NCCL wheel ships only as libnccl.so.2.
nccl=$(for d in "${ld[@]}"; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n 1)
if [[ -n "$nccl" ]]; then
  ln -sf "$nccl" "$scratch/lib/libnccl.so"
  [[ " ${ld[*]} " == *" $scratch/lib "* ]] || ld+=("$scratch/lib")
fi
ours_ld="${LD_LIBRARY_PATH:-}"
if ((${#ld[@]} > 0)); then
  ours_ld="$(IFS=:; echo "${ld[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
ours_inc="$(IFS=:; echo "${inc[*]}")"
# The prefix of our commands, and only of them. A fresh PTX cache: its key does not include the NVRTC version.
ours_env=("LD_LIBRARY_PATH=$ours_ld" "BERT2BERT_CUDA_INCLUDE=$ours_inc" "BERT2BERT_CACHE=$scratch/ptx"
  "NCCL_DEBUG=${NCCL_DEBUG:-WARN}" "BERT2BERT_LOG=${BERT2BERT_LOG:-info}" NO_COLOR=1)
ours=(env "${ours_env[@]}")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
printf 'ours: %s\n' "${ours_env[@]}"

say "GPU"
if ((EMU)); then
  skip nvidia-smi "no GPU (--emu)"
  "${ours[@]}" "$BIN" --version 2>/dev/null | sed 's/^/binary: /'
else
  timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm,power.limit \
    --format=csv 2>&1 || echo "gpu-check: nvidia-smi failed"
  timeout 60 "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
    2>&1 || echo "gpu-check: no torch in $PYTHON"
fi

have_bin=1
if [[ ! -f "$BIN" ]]; then
  echo "gpu-check: $BIN not found: build it with cargo build --release and copy it here"
  failed+=("bert2bert binary missing")
  have_bin=0
else
  [[ -x "$BIN" ]] || chmod +x "$BIN" 2>/dev/null
  if ! "${ours[@]}" "$BIN" --version >/dev/null; then
    echo "gpu-check: $BIN does not start here (glibc or architecture mismatch?)"
    failed+=("bert2bert does not start")
    have_bin=0
  fi
fi

# ---- 1. selftest: fp32, then bf16 ----
# The table goes to a file (a pipeline would run the stage in a subshell and lose its failure); shown here are its
# failed checks and its last line.
show_selftest() {
  grep -a -E 'FAIL' "$1" 2>/dev/null | head -n 20
  tail -n 1 "$1" 2>/dev/null
  grep -a -E 'ERROR|WARN|panicked' "$2" 2>/dev/null | tail -n 10
}
if ((have_bin)); then
  say "selftest fp32: bert2bert selftest --device $dev"
  run_stage "selftest fp32" 90 "$work/selftest.txt" "$work/selftest.log" "${ours[@]}" "$BIN" selftest --device "$dev"
  show_selftest "$work/selftest.txt" "$work/selftest.log"
  say "selftest bf16: bert2bert selftest --device $dev --precision bf16"
  run_stage "selftest bf16" 60 "$work/selftest_bf16.txt" "$work/selftest_bf16.log" \
    "${ours[@]}" "$BIN" selftest --device "$dev" --precision bf16
  show_selftest "$work/selftest_bf16.txt" "$work/selftest_bf16.log"
fi

# ---- 2. a CUDA worker through the coordinator ----
say "worker smoke: scripts/worker-smoke.sh (coordinator + one $dev worker, tiny job, NCCL world 1)"
t=$(limit 90)
# Our library path only on its bert2bert commands (B2B_LD_LIBRARY_PATH); its python keeps the caller's. Its own
# submit timeout ends first, so that it prints its logs.
run_stage "worker smoke" 90 "$work/worker-smoke.txt" - \
  env BERT2BERT="$BIN" PYTHON="$PYTHON" DEVICE="$dev" B2B_LD_LIBRARY_PATH="$ours_ld" SUBMIT_TIMEOUT_S=$((t > 25 ? t - 10 : t)) \
  "${ours_env[@]:1}" scripts/worker-smoke.sh "$work/worker-smoke"  # ours_env without its LD_LIBRARY_PATH
tail -n 4 "$work/worker-smoke.txt" 2>/dev/null

# ---- 3. our bench ----
if ((EMU)); then
  bench_args=(--config minilm --batch 2 --src-len 16 --tgt-len 16 --steps 2 --warmup 1)
elif ((QUICK)); then
  bench_args=(--config minilm --batch 8 --src-len 64 --tgt-len 64 --steps 3 --warmup 1)
else
  bench_args=(--config bert-base --batch 32 --src-len 128 --tgt-len 128 --steps 10 --warmup 2)
fi
if ((have_bin)); then
  say "bench: bert2bert bench --device $dev ${bench_args[*]} --json"
  run_stage "bench bert2bert" 90 "$work/bench_bert2bert.json" "$work/bench_bert2bert.log" \
    "${ours[@]}" "$BIN" bench --device "$dev" "${bench_args[@]}" --json
  tail -n 3 "$work/bench_bert2bert.log" 2>/dev/null
  cat "$work/bench_bert2bert.json" 2>/dev/null
  # 3b. The cost model against this device: the per-kernel table with the predicted H100 time
  # beside the time CUDA events measured (on the virtual GPU the bodies are skipped: prediction only).
  say "predict: bert2bert bench --device $dev ${bench_args[*]} --predict h100"
  run_stage "bench predict" 60 "$work/bench_predict.txt" "$work/bench_predict.log" \
    "${ours[@]}" "$BIN" bench --device "$dev" "${bench_args[@]}" --predict h100
  cat "$work/bench_predict.txt" 2>/dev/null
fi

# ---- 4, 5. PyTorch (the caller's environment) ----
if ((EMU)); then
  skip "pytorch eager" "no GPU (--emu)"
  skip "pytorch compile" "no GPU (--emu)"
elif ((QUICK)); then
  skip "pytorch eager" "--quick"
  skip "pytorch compile" "--quick"
else
  py_args=(--batch 32 --src-len 128 --tgt-len 128 --steps 10 --warmup 3 --json)
  say "pytorch eager: bench/pytorch_gpu.py --mode eager ${py_args[*]}"
  run_stage "pytorch eager" 90 "$work/bench_pytorch_eager.json" "$work/bench_pytorch_eager.log" \
    "$PYTHON" bench/pytorch_gpu.py --mode eager "${py_args[@]}"
  tail -n 8 "$work/bench_pytorch_eager.log" 2>/dev/null
  left=$((deadline - SECONDS))
  if ((left >= COMPILE_MIN_S)); then
    say "pytorch compile: bench/pytorch_gpu.py --mode compile ${py_args[*]}"
    run_stage "pytorch compile" 240 "$work/bench_pytorch_compile.json" "$work/bench_pytorch_compile.log" \
      "$PYTHON" bench/pytorch_gpu.py --mode compile --compile-warmup 3 "${py_args[@]}"
    tail -n 8 "$work/bench_pytorch_compile.log" 2>/dev/null
  else
    skip "pytorch compile" "time: ${left}s left, needs ${COMPILE_MIN_S}s; raise GPU_CHECK_BUDGET_S"
  fi
fi

# ---- summary ----
say "summary"
printf '%s\n' "${failed[@]}" >"$work/failed.txt"
printf '%s\n' "${skipped[@]}" >"$work/skipped.txt"
"$PYTHON" - "$work" "$dev" <<'EOF'
import json, os, re, sys

work, dev = sys.argv[1], sys.argv[2]


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


def lines(name):
    try:
        return [l for l in open(os.path.join(work, name)).read().splitlines() if l.strip()]
    except OSError:
        return []


def selftest(name):
    if not os.path.exists(os.path.join(work, name)):
        return "not run"
    text = "\n".join(lines(name))
    m = re.search(r"(\d+) checks, (\d+) failed", text)
    return f"{m.group(1)} checks, {m.group(2)} failed" if m else f"no result (see {name[:-4]}.log)"


stages = [l.split("\t") for l in lines("stages.tsv")]
print(f"stages (device {dev}):")
for name, status, secs in stages:
    print(f"  {name:<16} {status}" if status.startswith("skipped") else f"  {name:<16} {secs:>4} s  {status}")

rows = [("bert2bert", load("bench_bert2bert.json")),
        ("pytorch eager", load("bench_pytorch_eager.json")),
        ("pytorch compile", load("bench_pytorch_compile.json"))]
ours = num(rows[0][1], "tokens_per_s")
gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
fmt = lambda v, f: f.format(v) if v is not None else "-"
st = {"fp32": selftest("selftest.txt"), "bf16": selftest("selftest_bf16.txt")}
print(f"selftest: fp32 {st['fp32']}; bf16 {st['bf16']}")
smoke = [l for l in lines("worker-smoke.txt") if l.startswith("worker-smoke: ")]
smoke = smoke[-1][len("worker-smoke: "):] if smoke else "not run"
print(f"{dev} worker smoke: {smoke}")
d0 = next((d for _, d in rows if d), {}) or {}
print(f"device: {d0.get('device', '?')}; batch {d0.get('batch', '?')}, src {d0.get('src_len', '?')}, "
      f"tgt {d0.get('tgt_len', '?')}; MFU against 989 TFLOP/s (bf16 dense)")
head = f"{'':<16} {'step ms':>9} {'tokens/s':>10} {'ours/this':>9} {'MFU':>7} {'peak GiB':>9} {'alloc GiB':>9}"
print(head)
print("-" * len(head))
summary = {"device": dev, "stages": [{"name": n, "status": s, "seconds": int(t)} for n, s, t in stages],
           "selftest": st, "worker_smoke": smoke, "results": {}}
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
summary["failed_stages"] = lines("failed.txt")
summary["skipped_stages"] = lines("skipped.txt")
with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
EOF

# For each failed stage: the NCCL lines and the tail of its logs.
for f in "${failed[@]}"; do
  name="${f% (*}"
  while IFS= read -r log; do
    [[ -f "$log" ]] || continue
    printf '\n-- %s: %s\n' "$name" "${log#"$work"/}"
    if [[ "$log" == "$work/worker-smoke.txt" && -f "$work/worker-smoke/worker.log" ]]; then
      grep -a '^worker-smoke: ' "$log"  # the worker and coordinator logs follow, from the files themselves
      continue
    fi
    if grep -a -q NCCL "$log"; then
      echo "   NCCL lines (last 10):"
      grep -a NCCL "$log" | tail -n 10
      echo "   tail:"
    fi
    tail -n 15 "$log"
  done < <(stage_logs "$name")
done

echo
echo "files: $work"
rm -rf "$scratch"
((${#skipped[@]} > 0)) && echo "skipped (not failures): ${skipped[*]}"
if ((${#failed[@]} > 0)); then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages run passed"
