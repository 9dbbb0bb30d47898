# The cases of scripts/chaos.sh (sourced by it; uses its helpers and variables). Each case
# prints one line through `report`.
# shellcheck shell=bash disable=SC2154

case_init_over_user_dir() {
  mkdir -p x/thesis && echo work >x/thesis/ch1.tex
  ./bert2bert init --encoder bert --decoder bert --variant bert2bert --out x >init-x.log 2>&1
  local rc=$?
  if ((rc == 2)) && [[ "$(cat x/thesis/ch1.tex 2>/dev/null)" == work ]]; then
    report "init over user dir" held "exit 2, x/thesis/ch1.tex intact: $(head -n 1 init-x.log | head -c 160)"
  else
    report "init over user dir" broken "exit $rc; x/thesis: $(ls -A x/thesis 2>&1 | tr '\n' ' ')"
  fi
}

case_empty_store() {
  mkdir -p empty-state && : >empty-state/coordinator.sqlite
  timeout 20 ./bert2bert coordinator --listen 127.0.0.1:0 --state empty-state >empty.out 2>empty.log
  local rc=$?
  if ((rc != 0 && rc != 124)) && ! grep -q '^listening on ' empty.out && grep -q coordinator.sqlite empty.log; then
    report "empty job store" held "exit $rc: $(grep -m1 coordinator.sqlite empty.log | head -c 160)"
  else
    report "empty job store" broken "exit $rc; $(head -c 160 empty.out)"
  fi
}

# Waits for the job to end (60 s at most); sets st and restarts.
wait_terminal() {
  local t0
  t0=$(now)
  while :; do
    read -r st restarts < <(status_field "$1" '"\(.state) \(.restarts)"')
    [[ "$st" == FAILED || "$st" == SUCCEEDED || "$st" == CANCELLED ]] && return 0
    (($(awk -v s="$(since "$t0")" 'BEGIN { print (s > 60) }'))) && return 1
    sleep 0.1
  done
}

case_dev_zero() {
  start_coordinator state-zero || { report "/dev/zero data" broken "the coordinator did not start"; return; }
  start_worker worker-zero.log
  local w=$last_worker c=$coordinator_pid job rc t0
  printf '%s\n' "name: zero" "model: { init: $work/b2b }" \
    "data: { train: /dev/zero, max_source_len: 16, max_target_len: 12 }" \
    "training: { steps: 10, global_batch: 4, micro_batch: 4 }" "checkpoint: { dir: $work/ckpt-zero }" \
    "resources: { workers: 1, device: cpu, max_restarts: 3 }" >zero.yaml
  job=$(./bert2bert submit zero.yaml --coordinator "$url" 2>submit-zero.err)
  rc=$?
  if ((rc == 2)); then
    report "/dev/zero data" held "refused at submit: $(head -n 1 submit-zero.err | head -c 160)"
  elif ((rc != 0)); then
    report "/dev/zero data" broken "submit exit $rc: $(head -n 1 submit-zero.err)"
  else
    t0=$(now)
    wait_terminal "$job"
    if [[ "$st" == FAILED ]] && ((restarts == 0)) && kill -0 "$w" 2>/dev/null; then
      report "/dev/zero data" held "job FAILED in $(since "$t0") s, no restart, worker alive: $(status_field "$job" .reason | head -c 120)"
    else
      report "/dev/zero data" broken "state $st, restarts $restarts, worker $(kill -0 "$w" 2>/dev/null && echo alive || echo dead)"
    fi
  fi
  kill "$w" "$c" 2>/dev/null
}

case_yaml_flood() {
  start_coordinator state-flood || { report "nested-YAML flood" broken "the coordinator did not start"; return; }
  start_worker worker-flood.log
  local w=$last_worker c=$coordinator_pid job before after worst flood frc
  job=$(./bert2bert submit "$(long_job flood ckpt-flood)" --coordinator "$url") && wait_running "$job" 2 || {
    report "nested-YAML flood" broken "the victim job did not start"
    kill "$w" "$c"
    return
  }
  before=$(status_field "$job" .step)
  "$B2B_PYTHON" "$repo/scripts/chaos_client.py" flood --coordinator "${url#http://}" --copies 2 >flood.out 2>flood.err &
  flood=$!
  worst=0
  while kill -0 "$flood" 2>/dev/null; do
    local t0 dt
    t0=$(now)
    timeout 30 ./bert2bert list --coordinator "$url" >/dev/null 2>&1 || worst=999
    dt=$(since "$t0")
    worst=$(awk -v a="$worst" -v b="$dt" 'BEGIN { print (b > a) ? b : a }')
  done
  wait "$flood"
  frc=$?
  wait_running "$job" $((before + 1))
  after=$(status_field "$job" .step)
  if ((frc == 0)) && awk -v w="$worst" 'BEGIN { exit !(w < 2) }' && ((after > before)); then
    report "nested-YAML flood" held "$(tr '\n' ' ' <flood.out)| List worst ${worst} s; the running job went on (step $before -> $after)"
  else
    report "nested-YAML flood" broken "flood exit $frc ($(tr '\n' ' ' <flood.out) $(tail -n 2 flood.err)); List worst ${worst} s; step $before -> $after"
  fi
  kill "$w" "$c" 2>/dev/null
}

case_forged_reports() {
  start_coordinator state-forge || { report "forged reports" broken "the coordinator did not start"; return; }
  start_worker worker-forge.log
  local w=$last_worker c=$coordinator_pid job rc state restarts ckpt
  job=$(./bert2bert submit "$(long_job forge ckpt-forge)" --coordinator "$url") && wait_running "$job" 2 || {
    report "forged reports" broken "the victim job did not start"
    kill "$w" "$c"
    return
  }
  "$B2B_PYTHON" "$repo/scripts/chaos_client.py" forge --coordinator "${url#http://}" --job "$job" >forge.out 2>forge.err
  rc=$?
  wait_running "$job" 1
  read -r state restarts ckpt < <(status_field "$job" '"\(.state) \(.restarts) \(.checkpoint_step)"')
  if ((rc == 0)) && [[ "$state" == RUNNING ]] && ((restarts == 0 && ckpt < 99999)) && kill -0 "$w" 2>/dev/null; then
    report "forged reports" held "$(tr '\n' ' ' <forge.out)| job still RUNNING, restarts 0, committed step $ckpt"
  else
    report "forged reports" broken "client exit $rc ($(tr '\n' ' ' <forge.out) $(tail -n 2 forge.err)); job $state, restarts $restarts, committed $ckpt"
  fi
  kill "$w" "$c" 2>/dev/null
}

disk_job() { # checkpoint root -> disk.yaml: a local job checkpointing every 2 steps, keeping 1
  printf '%s\n' "name: disk" "model: { init: $work/b2b }" \
    "data: { train: $work/train.jsonl, max_source_len: 16, max_target_len: 12 }" \
    "training: { steps: 6, global_batch: 4, micro_batch: 4, lr: 1.0e-4, warmup_steps: 1, seed: 7 }" \
    "checkpoint: { dir: $1, every_steps: 2, keep: 1 }" "logging: { dir: $work/disk-logs }" \
    "resources: { workers: 1, device: cpu }" >disk.yaml
}

case_disk_full() {
  if [[ $(id -u) != 0 ]]; then
    report "disk full" skipped "mounting a tmpfs needs root"
    return
  fi
  # One checkpoint's size, from a run on the normal disk.
  disk_job "$work/ckpt-size"
  ./bert2bert train disk.yaml >disk-size.log 2>&1 || {
    report "disk full" broken "the sizing run failed: $(tail -n 1 disk-size.log)"
    return
  }
  local one rc partial used vrc rrc
  one=$(du -sb "$(find "$work/ckpt-size" -maxdepth 1 -name 'step-*' | sort | tail -n 1)" | cut -f1)
  mkdir -p full
  mount -t tmpfs -o size=$((one * 3 / 2)) tmpfs full || {
    report "disk full" skipped "mount failed"
    return
  }
  mounted+=("$work/full")
  disk_job "$work/full/ckpt"
  ./bert2bert train disk.yaml >disk-full.log 2>&1
  rc=$?
  partial=$(find full -name '*.tmp*' | wc -l)
  used=$(du -sb full/ckpt | cut -f1)
  if ((rc == 0)); then
    report "disk full" broken "the run did not hit ENOSPC (checkpoint $one bytes, tmpfs $((one * 3 / 2)))"
    return
  fi
  ./soak_fixture verify full/ckpt >disk-verify.txt 2>&1
  vrc=$?
  mount -o remount,size=$((one * 4)) full
  ./bert2bert train disk.yaml >disk-retry.log 2>&1
  rrc=$?
  ./soak_fixture verify full/ckpt >disk-verify2.txt 2>&1
  if ((partial == 0 && vrc == 0 && rrc == 0)) && [[ "$(tail -n 1 disk-verify2.txt)" == "6 ok" ]]; then
    report "disk full" held "ENOSPC run exit $rc, 0 partial dirs left ($used bytes used, one checkpoint $one), step $(tr '\n' ' ' <disk-verify.txt)after it; with room the retry finished at step 6"
  else
    report "disk full" broken "exit $rc, $partial partial dirs, verify: $(tr '\n' ' ' <disk-verify.txt); retry exit $rrc: $(tail -n 1 disk-retry.log)"
  fi
}

case_soak() {
  SOAK_BIN_DIR=$bins SOAK_KILLS=${CHAOS_KILLS:-5} SOAK_STEPS=${CHAOS_SOAK_STEPS:-6000} "$repo/scripts/soak.sh" >soak.out 2>soak.err
  local rc=$?
  if ((rc == 0)); then
    report "kill-9 soak" held "$(grep -h '^SOAK OK\|^recovery' soak.out | tr '\n' ' ' | head -c 400)"
  else
    report "kill-9 soak" broken "exit $rc: $(tail -n 3 soak.err | tr '\n' ' ')"
  fi
}
