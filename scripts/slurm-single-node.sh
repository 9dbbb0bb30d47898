#!/usr/bin/env bash
# deploy/slurm/bert2bert.sbatch on a real Slurm: a single-node cluster from Debian's packages
# (slurmctld, slurmd, munge) on this machine, and a 2-task CPU job through `sbatch` that must end
# SUCCEEDED. docs/slurm.md records a run. Too slow for CI (apt, daemons, a training job): a
# script to run by hand, as root, on a Debian machine that runs no Slurm of its own.
#
#   scripts/slurm-single-node.sh [WORKDIR]      (default: a new /tmp/slurm-single-node.XXXXXX)
#
# Needs: the bert2bert binary ($BERT2BERT, default target/debug/bert2bert, else target/release)
# and python3. It installs the packages (apt-get update first), writes /etc/slurm/slurm.conf
# for this one node (overwriting one that this script wrote before, refusing any other),
# starts munged, slurmctld and slurmd, submits the job with `sbatch --wait`, and checks with
# `bert2bert status` (against a coordinator restarted on the job's state directory) that the
# job SUCCEEDED. The daemons are stopped at the end. Everything stays on this machine: the node
# name resolves to a local address, and nothing is downloaded but the Debian packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BERT2BERT:-}"
if [[ -z "$bin" ]]; then
  for b in "$root/target/debug/bert2bert" "$root/target/release/bert2bert" "${CARGO_TARGET_DIR:-/nonexistent}/debug/bert2bert"; do
    [[ -x "$b" ]] && bin="$b" && break
  done
fi
[[ -x "$bin" ]] || { echo "slurm-single-node: no bert2bert binary (set BERT2BERT)" >&2; exit 2; }
bin="$(realpath "$bin")"
((EUID == 0)) || { echo "slurm-single-node: run as root (it installs packages and starts daemons)" >&2; exit 2; }
work="${1:-$(mktemp -d /tmp/slurm-single-node.XXXXXX)}"
mkdir -p "$work"
work="$(realpath "$work")"
say() { echo "slurm-single-node: $*"; }

say "installing slurmctld, slurmd, munge"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge >/dev/null

node="$(hostname -s)"
getent hosts "$node" >/dev/null || { echo "slurm-single-node: $node does not resolve; add it to /etc/hosts" >&2; exit 1; }
conf=/etc/slurm/slurm.conf
marker="# written by bert2bert scripts/slurm-single-node.sh"
if [[ -e "$conf" ]] && ! grep -qF "$marker" "$conf"; then
  echo "slurm-single-node: $conf exists and is not ours: this machine has a Slurm of its own" >&2
  exit 1
fi
cpus="$(nproc)"
mem_mb="$(($(awk '/^MemTotal/ { print $2 }' /proc/meminfo) / 1024 / 2))"
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# The smallest configuration that runs jobs without systemd or cgroups (a container): processes
# tracked through /proc, no task binding, no accounting, root as the Slurm user.
cat >"$conf" <<CONF
$marker
ClusterName=b2b
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

stop_daemons() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    [[ -s "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  [[ -n "${munged:-}" ]] && kill "$munged" 2>/dev/null || true
}
trap stop_daemons EXIT
stop_daemons

say "starting munged, slurmctld, slurmd (node $node, $cpus CPUs)"
mkdir -p /run/munge && chown munge:munge /run/munge
runuser -u munge -- /usr/sbin/munged --foreground >/var/log/slurm/munged.log 2>&1 &
munged=$!
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null
slurmctld
slurmd
for _ in $(seq 100); do
  sinfo -h -o %T -n "$node" 2>/dev/null | grep -qE "^idle" && break
  sleep 0.2
done
sinfo

say "tiny model and job in $work"
data="$root/examples/data/kjv_web_sample/train.jsonl"
python3 "$root/scripts/tiny_bert.py" "$data" "$work/bert"
"$bin" init --encoder "$work/bert" --decoder "$work/bert" --variant "$(cat "$work/bert/variant")" --out "$work/b2b"
cat >"$work/job.yaml" <<YAML
name: slurm-single-node
model: { init: $work/b2b }
data: { train: $data, max_source_len: 32, max_target_len: 32 }
training: { steps: 8, global_batch: 4, micro_batch: 2, lr: 1.0e-3, warmup_steps: 2, precision: fp32, seed: 1 }
checkpoint: { dir: $work/ckpt, every_steps: 4, keep: 1 }
resources: { workers: 2, device: cpu, max_restarts: 0 }
YAML

say "sbatch --wait: 2 CPU tasks"
status=0
(cd "$work" && B2B_BIN="$bin" B2B_STATE="$work/state" timeout 900 sbatch --wait --gres=none --ntasks-per-node=2 \
  --cpus-per-task=1 --mem-per-cpu=1024 --time=00:15:00 --output="$work/slurm-%j.out" \
  "$root/deploy/slurm/bert2bert.sbatch" --cpu "$work/job.yaml") || status=$?
cat "$work"/slurm-*.out
say "sbatch --wait exit $status"
((status == 0)) || { tail -n 20 "$work"/state/*.log /var/log/slurm/*.log; exit 1; }

# Ask again, independently of the batch script: a coordinator restarted on the job's state
# directory (jobs live in its SQLite) reports the job's final state.
say "bert2bert status, from a coordinator restarted on $work/state"
id="$(head -n 1 "$work/state/job-id")"
export BERT2BERT_TOKEN=slurm-single-node-check
"$bin" coordinator --listen 127.0.0.1:0 --state "$work/state" >"$work/check.out" 2>"$work/check.log" &
check=$!
for _ in $(seq 100); do grep -q "^listening on " "$work/check.out" 2>/dev/null && break; sleep 0.1; done
url="http://$(sed -n 's/^listening on //p' "$work/check.out" | head -n 1)"
final="$("$bin" status "$id" --coordinator "$url")"
kill "$check"
wait "$check" 2>/dev/null || true
echo "$final"
grep -qE "^state: +SUCCEEDED$" <<<"$final" || { say "FAILED: job $id did not succeed"; exit 1; }
say "OK: job $id SUCCEEDED through sbatch on a single-node Slurm"
