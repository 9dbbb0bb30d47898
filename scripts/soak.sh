#!/usr/bin/env bash
# Failure-recovery soak: a coordinator, one job on 3 CPU workers (a tiny random BERT2BERT from
# the test fixtures, so nothing is downloaded), and a loop that kills a random worker with
# kill -9 at a random moment and starts a replacement, SOAK_KILLS times (default 20). Then it
# waits for the job and checks that
#   - the job SUCCEEDED with step == total steps,
#   - the committed checkpoint step the coordinator reports never went backwards and never
#     passed the final step (no committed step lost),
#   - every checkpoint directory left on disk has a manifest that verifies (none corrupt).
# It prints each kill's recovery time (kill -9 -> the first progress report of the re-formed
# gang, i.e. the first step past its resume point) and the steps it lost (the coordinator's
# goodput: steps rank 0 had reported past the step the next attempt resumed from), with their
# min/median/max, and the job's goodput.
#
# Survivors keep their training state in memory and the re-formed gang resumes from it (recovery
# from peers); SOAK_PEER_STATE=0 starts the workers with --no-peer-state, so that every recovery
# resumes from the last checkpoint instead (the baseline to compare with).
#
# Knobs: SOAK_KILLS (20), SOAK_STEPS (job length, 20000), SOAK_BUDGET_S (600: the whole run is
# cut off, and fails, after this), SOAK_KEEP=1 keeps the work directory (logs, checkpoints),
# SOAK_BIN_DIR=DIR uses the bert2bert and soak_fixture binaries in DIR instead of building them.
# Timeouts as in cli/tests/recovery.rs: heartbeat 2 s, collective 3 s, elastic wait 2 s.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${SOAK_KILLS:-20}
PEER_STATE=${SOAK_PEER_STATE:-1}
worker_flags=()
[[ "$PEER_STATE" == 0 ]] && worker_flags+=(--no-peer-state)
STEPS=${SOAK_STEPS:-20000}
BUDGET=${SOAK_BUDGET_S:-600}
start=$(date +%s)
deadline=$((start + BUDGET))

work=$(mktemp -d "${TMPDIR:-/tmp}/b2b-soak.XXXXXX")
# Copies, so that another build in target/ cannot swap the binary mid-run.
if [[ -n "${SOAK_BIN_DIR:-}" ]]; then
  cp "$SOAK_BIN_DIR/bert2bert" "$SOAK_BIN_DIR/soak_fixture" "$work/"
else
  cargo build --locked --profile test -p bert2bert --bin bert2bert --example soak_fixture >&2
  cp target/debug/bert2bert target/debug/examples/soak_fixture "$work/"
fi
cd "$work"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n "${SOAK_KEEP:-}" ]]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
  echo "SOAK FAILED: $*" >&2
  tail -n 20 coordinator.log >&2 || true
  exit 1
}
left() { echo $((deadline - $(date +%s))); }
now() { date +%s.%N; }

./soak_fixture model .
./bert2bert init --encoder bert --decoder bert --variant bert2bert --out b2b >init.log 2>&1 || fail "init: $(cat init.log)"
cat >job.yaml <<EOF
name: soak
model: { init: b2b }
data: { train: train.jsonl, max_source_len: 16, max_target_len: 12 }
training: { steps: $STEPS, global_batch: 12, micro_batch: 2, lr: 1.0e-4, warmup_steps: 10, seed: 7 }
checkpoint: { dir: ckpt, every_steps: 20, keep: 3 }
resources: { workers: 3, min_workers: 2, device: cpu, max_restarts: $((KILLS * 4 + 10)) }
EOF

export BERT2BERT_TOKEN=soak-token BERT2BERT_WORKER_TOKEN=soak-token NO_COLOR=1 BERT2BERT_LOG=info
unset BERT2BERT_COORDINATOR
./bert2bert coordinator --listen 127.0.0.1:0 --state state --heartbeat-timeout 2 --elastic-wait 2 \
  >coordinator.out 2>coordinator.log &
pids+=($!)
until grep -q '^listening on ' coordinator.out; do
  (($(left) > 0)) || fail "the coordinator did not start"
  kill -0 "${pids[0]}" 2>/dev/null || fail "the coordinator exited"
  sleep 0.05
done
url="http://$(sed -n 's/^listening on //p' coordinator.out)"

workers=()
started=0
start_worker() {
  started=$((started + 1))
  ./bert2bert worker --coordinator "$url" --collective-timeout 3 "${worker_flags[@]}" </dev/null 2>"worker-$started.log" &
  pids+=($!)
  workers+=($!)
  # No "Killed" notices from the shell: the kills are the point.
  disown $!
}
for _ in 1 2 3; do start_worker; done
job=$(./bert2bert submit job.yaml --coordinator "$url")

# One status poll: sets state, step, restarts, committed, lost (goodput's steps lost so far) and
# goodput (its ratio); checks that the committed step never goes backwards.
committed=0
max_committed=0
poll() {
  local j
  j=$(./bert2bert status "$job" --json --coordinator "$url" 2>/dev/null) || return 1
  read -r state step restarts committed lost goodput < <(jq -r \
    '"\(.state) \(.step) \(.restarts) \(.checkpoint_step) \(.goodput.steps_lost // 0) \(.goodput.ratio // 0)"' <<<"$j")
  ((committed >= max_committed)) || fail "committed checkpoint went back from $max_committed to $committed"
  max_committed=$committed
}

poll || fail "status"
until [[ "$state" == RUNNING ]] && ((step > 0)); do
  (($(left) > 0)) || fail "the job never started"
  sleep 0.1
  poll || true
done

times=()
losses=()
for k in $(seq 1 "$KILLS"); do
  # A random moment: 0.3 to 4 s into the run of the current gang.
  sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.3 + 3.7 * r / 32767 }')"
  poll || fail "status before kill $k"
  [[ "$state" == RUNNING ]] || fail "kill $k: the job is $state (raise SOAK_STEPS if it finished)"
  i=$((RANDOM % ${#workers[@]}))
  victim=${workers[$i]}
  r0=$restarts
  lost0=$lost
  at_step=$step
  t0=$(now)
  kill -9 "$victim"
  workers=("${workers[@]:0:$i}" "${workers[@]:$((i + 1))}")
  start_worker
  # Recovered: the job was requeued (restarts went up), runs again, and its step moved after
  # it did (progress only counts from the current attempt's rank 0).
  base=""
  while :; do
    (($(left) > 0)) || fail "kill $k: no recovery within the budget"
    sleep 0.1
    poll || continue
    [[ "$state" == SUCCEEDED || "$state" == FAILED ]] && fail "kill $k: the job ended ($state) while recovering"
    ((restarts > r0)) || continue
    [[ "$state" == RUNNING ]] || { base=""; continue; }
    if [[ -z "$base" ]]; then base=$step; continue; fi
    [[ "$step" != "$base" ]] && break
  done
  dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
  times+=("$dt")
  losses+=($((lost - lost0)))
  printf 'kill %2d: worker pid %s at step %s -> resumed and at step %s after %s s (restarts %s, steps lost %s)\n' \
    "$k" "$victim" "$at_step" "$step" "$dt" "$restarts" "$((lost - lost0))"
done

until [[ "$state" == SUCCEEDED || "$state" == FAILED ]]; do
  (($(left) > 0)) || fail "the job did not finish within ${BUDGET}s (at step $step of $STEPS)"
  sleep 0.2
  poll || true
done
[[ "$state" == SUCCEEDED ]] || fail "the job is $state: $(./bert2bert status "$job" --coordinator "$url" 2>&1)"
((step == STEPS)) || fail "the job SUCCEEDED at step $step, not $STEPS"
((max_committed <= step)) || fail "committed step $max_committed is past the final step $step"
((committed == STEPS)) || fail "the last committed checkpoint is $committed, not $STEPS"
./soak_fixture verify ckpt >verify.txt || fail "a checkpoint does not verify: $(cat verify.txt)"
[[ "$(tail -n 1 verify.txt)" == "$STEPS ok" ]] || fail "the newest checkpoint on disk is not step $STEPS"

# "min M, median D, max X (n=N)" of the numbers given as arguments.
summary() {
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "min %s, median %s, max %s (n=%d)", v[1], m, v[NR], NR }'
}
echo "SOAK OK: job $job SUCCEEDED at step $step of $STEPS after $KILLS kill -9s ($restarts restarts) in $(($(date +%s) - start)) s;" \
  "checkpoints on disk verify: $(tr '\n' ' ' <verify.txt)"
mode=$([[ "$PEER_STATE" == 0 ]] && echo "from the checkpoint (--no-peer-state)" || echo "from peers' memory")
echo "recovery $mode"
echo "recovery time (kill -9 -> first step past the resume point), s: $(summary "${times[@]}")"
echo "steps lost per kill: $(summary "${losses[@]}"); in all $lost; goodput $(printf '%.3f' "$goodput")"
