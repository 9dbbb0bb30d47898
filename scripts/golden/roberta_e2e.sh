#!/usr/bin/env bash
# RoBERTa and two vocabularies against transformers, end to end through the CLI (NOT run in CI: needs torch and
# transformers; the CI's Rust tests cover the same code on committed fixtures). For each of roberta2roberta,
# robertashare and bert2roberta (a BERT encoder with a RoBERTa decoder, two vocabularies), built by `bert2bert init`
# from tiny random checkpoints that transformers saved (gen_tiny_pretrained.py):
#   - EncoderDecoderModel.from_pretrained of the init output loads with no missing or unexpected keys;
#   - `bert2bert score` losses are within 1e-4 (relative) of transformers' float64 ones, gradients within 1e-3.
# Usage: scripts/golden/roberta_e2e.sh PYTHON BERT2BERT_BINARY [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:?python with torch and transformers}
bin=${2:?the bert2bert binary}
work=${3:-$(mktemp -d)}
data=../shared/data/kjv_web/validation.jsonl
"$py" scripts/golden/gen_tiny_pretrained.py --text ../shared/data/kjv_web/train.jsonl --out "$work" >/dev/null 2>&1
head -n 16 "$data" > "$work/pairs.jsonl"
for spec in "roberta2roberta tiny-roberta tiny-roberta" "robertashare tiny-roberta tiny-roberta" \
            "bert2bert tiny-bert tiny-roberta"; do
  read -r variant enc dec <<<"$spec"
  name="$variant-$enc-$dec"
  out="$work/$name"
  rm -rf "$out"
  "$bin" init --encoder "$work/$enc" --decoder "$work/$dec" --variant "$variant" --out "$out" --seed 3 > "$work/$name.init.txt"
  "$bin" score --model "$out" --data "$work/pairs.jsonl" --json --grads-out "$work/$name.grads.safetensors" \
    > "$work/$name.score.json"
  echo "== $name"
  "$py" scripts/hf_check.py --model "$out" --data "$work/pairs.jsonl" --n 16 --score-json "$work/$name.score.json" \
    --grads "$work/$name.grads.safetensors" | grep -E "loading info|per_example_loss|mean_loss:|gradients:|^OK|FAIL"
done
