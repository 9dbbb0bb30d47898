#!/usr/bin/env bash
# The reliability suite (issue 11): tries the system the way a careless user and a hostile
# client would, and prints one line per case, "held" or "broken", with what it saw. Not a CI
# test: it takes a few minutes and the disk-full case mounts a tmpfs (root only; it says
# "skipped" otherwise). Exit 0 when every case that ran held.
#
# Cases:
#   kill-9 soak        scripts/soak.sh with CHAOS_KILLS kill -9s of 3 workers (default 5): the job
#                      succeeds, no committed step is lost, every checkpoint on disk verifies.
#   disk full          a local run checkpointing onto a tmpfs too small for two checkpoints: the
#                      run fails cleanly, no partial checkpoint dir is left, the last good one
#                      verifies, and once there is room the same run resumes and finishes.
#   nested-YAML flood  two submits of 'name: ' + '['*100000 + ']'*100000 while a job runs: both
#                      are refused (exit 2), List from another client stays under 2 s, and the
#                      running job keeps stepping.
#   forged reports     a client holding only the shared worker token registers itself, then
#                      sends ReportDone / CommitCheckpoint(/etc) / ReportFailed for the running
#                      job's real worker: every one is refused and the job is unchanged.
#   init over user dir `init --out` onto a directory of user files: exit 2, the files intact.
#   /dev/zero data     a job whose data.train is /dev/zero: refused at submit or failed at once,
#                      never retried, no worker dies.
#   empty job store    a zero-length coordinator.sqlite: the coordinator refuses to start.
#
# Knobs: CHAOS_KILLS (5), CHAOS_SOAK_STEPS (6000), CHAOS_KEEP=1 keeps the work directory,
# CHAOS_BIN_DIR=DIR tests the bert2bert and soak_fixture binaries in DIR instead of building
# them (e.g. an older release, to see which cases it breaks).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bins=${CHAOS_BIN_DIR:-}
if [[ -z "$bins" ]]; then
  cargo build --locked --profile test -p bert2bert --bin bert2bert --example soak_fixture >&2 || exit 1
  bins=target/debug
fi
B2B_PYTHON=${B2B_PYTHON:-$(scripts/setup_python.sh)}
work=$(mktemp -d "${TMPDIR:-/tmp}/b2b-chaos.XXXXXX")
cp "$bins/bert2bert" "$work/"
if [[ -x "$bins/soak_fixture" ]]; then cp "$bins/soak_fixture" "$work/"; else cp "$bins/examples/soak_fixture" "$work/"; fi
bins=$(cd "$work" && pwd)
cd "$work" || exit 1

pids=()
mounted=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for m in "${mounted[@]}"; do umount "$m" 2>/dev/null || true; done
  if [[ -n "${CHAOS_KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

broken=0
report() { # case, held|broken|skipped, detail
  printf '%-18s %s: %s\n' "$1" "$2" "$3"
  [[ "$2" == broken ]] && broken=$((broken + 1))
  return 0
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

export BERT2BERT_TOKEN=chaos-client BERT2BERT_WORKER_TOKEN=chaos-worker NO_COLOR=1 BERT2BERT_LOG=info
unset BERT2BERT_COORDINATOR

./soak_fixture model . || exit 1
./bert2bert init --encoder bert --decoder bert --variant bert2bert --out b2b >init.log 2>&1 || {
  cat init.log >&2
  exit 1
}

# A coordinator in state dir $1; sets $url and remembers its pid.
start_coordinator() {
  local state=$1 out=$1.out
  ./bert2bert coordinator --listen 127.0.0.1:0 --state "$state" \
    --heartbeat-timeout 2 --elastic-wait 2 >"$out" 2>"$state.log" &
  pids+=($!)
  coordinator_pid=$!
  local t0
  t0=$(now)
  until grep -q '^listening on ' "$out" 2>/dev/null; do
    kill -0 "$coordinator_pid" 2>/dev/null || return 1
    (($(awk -v s="$(since "$t0")" 'BEGIN { print (s > 30) }'))) && return 1
    sleep 0.05
  done
  url="http://$(sed -n 's/^listening on //p' "$out")"
}

start_worker() { # log file
  ./bert2bert worker --coordinator "$url" --collective-timeout 3 </dev/null 2>"$1" &
  pids+=($!)
  last_worker=$!
}

status_field() { # job, jq expression
  ./bert2bert status "$1" --json --coordinator "$url" 2>/dev/null | jq -r "$2"
}

# Waits until the job is RUNNING and past step $2 (default 1); 60 s at most.
wait_running() {
  local job=$1 past=${2:-1} t0
  t0=$(now)
  while :; do
    read -r st sp < <(status_field "$job" '"\(.state) \(.step)"')
    [[ "$st" == RUNNING ]] && ((sp >= past)) && return 0
    [[ "$st" == SUCCEEDED || "$st" == FAILED || "$st" == CANCELLED ]] && return 1
    (($(awk -v s="$(since "$t0")" 'BEGIN { print (s > 60) }'))) && return 1
    sleep 0.1
  done
}

long_job() { # name, checkpoint dir -> a job file on one worker that runs for minutes
  cat >"$1.yaml" <<EOF
name: $1
model: { init: $work/b2b }
data: { train: $work/train.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: 100000, global_batch: 4, micro_batch: 4, lr: 1.0e-4, warmup_steps: 10, seed: 7 }
checkpoint: { dir: $work/$2, every_steps: 50, keep: 2 }
resources: { workers: 1, device: cpu, max_restarts: 3 }
EOF
  echo "$work/$1.yaml"
}

source "$repo/scripts/chaos_cases.sh"

case_init_over_user_dir
case_empty_store
case_dev_zero
case_yaml_flood
case_forged_reports
case_disk_full
case_soak

echo "chaos: $broken broken"
((broken == 0))
