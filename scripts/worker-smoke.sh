#!/usr/bin/env bash
# A distributed run end to end with real processes: a coordinator, one worker, a tiny job submitted
# with --wait. On a GPU machine (DEVICE=cuda, the default; gpu-check.sh stage 5) it is the only check
# of a CUDA worker: registration as cuda, rank 0 making the NCCL unique id and posting it, the
# coordinator relaying it, the communicator (world 1), training on the GPU through the agent, and the
# checkpoint commit. DEVICE=cpu runs the same flow on a CPU worker (how this script is tested
# without a GPU).
#
# Needs: the bert2bert binary ($BERT2BERT, default target/release/bert2bert) and python3 with torch
# and transformers ($PYTHON), which make a tiny random BERT with a small WordPiece vocabulary from
# the committed kjv_web sample (nothing is downloaded). Writes into $1 (default: a temp dir).
# Exit status 0 when the job SUCCEEDED and its final checkpoint exists.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
BIN="$(realpath "${BERT2BERT:-$root/target/release/bert2bert}")"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
work="${1:-$(mktemp -d /tmp/worker-smoke.XXXXXX)}"
mkdir -p "$work"
cd "$work"
data="$root/examples/data/kjv_web_sample/train.jsonl"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "worker-smoke: tiny BERT in $work/bert"
"$PYTHON" - "$data" bert <<'PY'
import collections, json, os, re, sys
from transformers import BertConfig, BertModel, BertTokenizerFast
import torch

data, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
words = collections.Counter()
with open(data) as f:
    for i, line in enumerate(f):
        if i >= 400:
            break
        row = json.loads(line)
        words.update(re.findall(r"[a-z]+|[^\sa-z]", (row["source"] + " " + row["target"]).lower()))
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(300)]
with open(os.path.join(out, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
tok = BertTokenizerFast(vocab_file=os.path.join(out, "vocab.txt"), do_lower_case=True)
tok.save_pretrained(out)
torch.manual_seed(0)
cfg = BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                 intermediate_size=96, max_position_embeddings=64)
BertModel(cfg, add_pooling_layer=True).save_pretrained(out, safe_serialization=True)
print(f"vocab {len(vocab)}, hidden 48, 2 layers")
PY

"$BIN" init --encoder bert --decoder bert --variant bert2bert --out b2b
precision=fp32
[[ "$DEVICE" == cuda ]] && precision=bf16
cat >job.yaml <<YAML
name: worker-smoke
model: { init: $work/b2b }
data: { train: $data, max_source_len: 32, max_target_len: 32 }
training: { steps: 20, global_batch: 8, micro_batch: 8, lr: 1.0e-3, warmup_steps: 2, precision: $precision, seed: 1 }
checkpoint: { dir: $work/ckpt, every_steps: 10, keep: 2 }
resources: { workers: 1, device: $DEVICE, max_restarts: 0 }
YAML

export BERT2BERT_TOKEN=worker-smoke-token
"$BIN" coordinator --listen 127.0.0.1:0 --state state >coordinator.out 2>coordinator.log &
pids+=($!)
for _ in $(seq 100); do
  grep -q "^listening on " coordinator.out 2>/dev/null && break
  sleep 0.1
done
url="http://$(sed -n 's/^listening on //p' coordinator.out | head -n 1)"
[[ "$url" != "http://" ]] || { echo "worker-smoke: the coordinator did not start"; cat coordinator.log; exit 1; }
echo "worker-smoke: coordinator at $url"
"$BIN" worker --coordinator "$url" --device "$DEVICE" 2>worker.log &
pids+=($!)
status=0
timeout 180 "$BIN" submit job.yaml --coordinator "$url" --wait || status=$?
tail -n 15 worker.log
if ((status != 0)); then
  echo "worker-smoke: FAILED (submit --wait exit $status)"
  tail -n 20 coordinator.log
  exit 1
fi
[[ -f ckpt/step-00000020/manifest.json ]] || { echo "worker-smoke: FAILED: no final checkpoint"; ls ckpt; exit 1; }
echo "worker-smoke: OK ($DEVICE worker trained 20 steps; final checkpoint ckpt/step-00000020)"
