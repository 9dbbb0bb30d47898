#!/usr/bin/env bash
# A distributed run end to end with real processes: a coordinator, one worker, a tiny job submitted
# with --wait. On a GPU machine (DEVICE=cuda, the default; gpu-check.sh stage 2) it is the only check
# of a CUDA worker: registration as cuda, rank 0 making the NCCL unique id and posting it, the
# coordinator relaying it, the communicator (world 1), training on the GPU through the agent, and the
# checkpoint commit. DEVICE=cuda-emu runs the same flow on the virtual GPU (a `worker --device
# cuda-emu` takes the job's `device: cuda`; emulated NCCL); DEVICE=cpu on a CPU worker.
#
# Needs: the bert2bert binary ($BERT2BERT, default target/release/bert2bert) and python3 ($PYTHON).
# With torch and transformers, python makes a tiny random BERT (weights and a small WordPiece
# vocabulary from the committed kjv_web sample; nothing is downloaded) and the job starts from it
# (init --variant bert2bert). Without them it says so and writes only the config and tokenizer with
# the standard library; the job then starts from random weights (init --variant rnd2rnd).
# Writes into $1 (default: a temp dir): coordinator.log, worker.log (NCCL warnings land there),
# job.yaml, ckpt/. Exit status 0 when the job SUCCEEDED and its final checkpoint exists.
#
# Environment for our binary only (python keeps the caller's environment, so torch keeps its own
# libraries): B2B_LD_LIBRARY_PATH, when set, is the whole LD_LIBRARY_PATH of every bert2bert command.
# SUBMIT_TIMEOUT_S (default 180): how long `submit --wait` may take.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
BIN="$(realpath "${BERT2BERT:-$root/target/release/bert2bert}")"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
SUBMIT_TIMEOUT_S="${SUBMIT_TIMEOUT_S:-180}"
work="${1:-$(mktemp -d /tmp/worker-smoke.XXXXXX)}"
mkdir -p "$work"
cd "$work"
data="$root/examples/data/kjv_web_sample/train.jsonl"

if [[ -n "${B2B_LD_LIBRARY_PATH:-}" ]]; then
  b2b=(env "LD_LIBRARY_PATH=$B2B_LD_LIBRARY_PATH" "$BIN")
else
  b2b=("$BIN")
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "worker-smoke: tiny BERT in $work/bert"
timeout 180 "$PYTHON" "$here/tiny_bert.py" "$data" bert || { echo "worker-smoke: FAILED: $PYTHON could not make the tiny model (exit $?)"; exit 1; }

"${b2b[@]}" init --encoder bert --decoder bert --variant "$(cat bert/variant)" --out b2b
precision=fp32
[[ "$DEVICE" == cuda* ]] && precision=bf16
# A cuda-emu worker takes `device: cuda` jobs: the job file names the real kind either way.
job_device=$DEVICE
[[ "$DEVICE" == cuda* ]] && job_device=cuda
cat >job.yaml <<YAML
name: worker-smoke
model: { init: $work/b2b }
data: { train: $data, max_source_len: 32, max_target_len: 32 }
training: { steps: 20, global_batch: 8, micro_batch: 8, lr: 1.0e-3, warmup_steps: 2, precision: $precision, seed: 1 }
checkpoint: { dir: $work/ckpt, every_steps: 10, keep: 2 }
resources: { workers: 1, device: $job_device, max_restarts: 0 }
YAML

export BERT2BERT_TOKEN=worker-smoke-token
"${b2b[@]}" coordinator --listen 127.0.0.1:0 --state state >coordinator.out 2>coordinator.log &
pids+=($!)
for _ in $(seq 100); do
  grep -q "^listening on " coordinator.out 2>/dev/null && break
  sleep 0.1
done
url="http://$(sed -n 's/^listening on //p' coordinator.out | head -n 1)"
[[ "$url" != "http://" ]] || { echo "worker-smoke: FAILED: the coordinator did not start"; cat coordinator.log; exit 1; }
echo "worker-smoke: coordinator at $url"
"${b2b[@]}" worker --coordinator "$url" --device "$DEVICE" 2>worker.log &
worker_pid=$!
pids+=("$worker_pid")
# --foreground: a timeout around this whole script (gpu-check.sh's) signals its process group, which
# then includes this submit.
timeout --foreground "$SUBMIT_TIMEOUT_S" "${b2b[@]}" submit job.yaml --coordinator "$url" --wait &
submit_pid=$!
pids+=("$submit_pid")
# A worker that dies (no driver, a library it cannot load) ends the wait at once, not at the timeout.
why=
while kill -0 "$submit_pid" 2>/dev/null; do
  if ! kill -0 "$worker_pid" 2>/dev/null; then
    wstatus=0
    wait "$worker_pid" || wstatus=$?
    why="the worker exited (status $wstatus) before the job ended"
    kill "$submit_pid" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
status=0
wait "$submit_pid" || status=$?
tail -n 15 worker.log
if ((status != 0)); then
  echo "worker-smoke: FAILED (${why:-submit --wait exit $status})"
  if grep -a -q NCCL worker.log; then
    echo "-- NCCL lines of worker.log:"
    grep -a NCCL worker.log | tail -n 20
  fi
  echo "-- coordinator.log:"
  tail -n 20 coordinator.log
  exit 1
fi
[[ -f ckpt/step-00000020/manifest.json ]] || { echo "worker-smoke: FAILED: no final checkpoint"; ls ckpt; exit 1; }
echo "worker-smoke: OK ($DEVICE worker trained 20 steps; final checkpoint ckpt/step-00000020)"
