#!/usr/bin/env bash
# Side-by-side CPU training-step benchmark: `bert2bert bench` vs PyTorch/transformers on the same config.
#
#   bench/compare_cpu.sh [--model DIR] [--batch B] [--src-len S] [--tgt-len T] [--steps N] [--warmup W]
#                        [--threads N] [--pytorch-only]
# Environment equivalents (flags win): MODEL (default models/minilm-b2b), B=16, S=64, T=64, STEPS=5, WARMUP=1,
# THREADS (PyTorch threads, default: all cores, like rayon), BERT2BERT (default target/release/bert2bert),
# PYTHON (default python3).
#
# Prints a table and "speedup (pytorch_ms / bert2bert_ms): X.XX"; saves both JSON objects to
# bench/results/cpu-<UTC timestamp>.json. The two runs are separate processes, run one after the other, so the
# peak RSS of each is its own. Run on an otherwise idle machine: a concurrent build skews both numbers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

MODEL="${MODEL:-models/minilm-b2b}"
B="${B:-16}"
S="${S:-64}"
T="${T:-64}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-1}"
THREADS="${THREADS:-$(nproc)}"
BERT2BERT="${BERT2BERT:-target/release/bert2bert}"
PYTHON="${PYTHON:-python3}"
PYTORCH_ONLY=0

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --batch) B="$2"; shift 2 ;;
    --src-len) S="$2"; shift 2 ;;
    --tgt-len) T="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --pytorch-only) PYTORCH_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$root"
if [[ ! -f "$MODEL/config.json" ]]; then
  echo "error: $MODEL/config.json not found; create it with: bert2bert init --encoder HF_BERT_DIR --decoder HF_BERT_DIR --variant bert2bert --out $MODEL" >&2
  exit 2
fi
if [[ "$PYTORCH_ONLY" != 1 && ! -x "$BERT2BERT" ]]; then
  echo "error: $BERT2BERT not found or not executable (cargo build --release, or set BERT2BERT=...)" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "config: model=$MODEL batch=$B src_len=$S tgt_len=$T steps=$STEPS warmup=$WARMUP pytorch_threads=$THREADS cores=$(nproc)" >&2

if [[ "$PYTORCH_ONLY" == 1 ]]; then
  echo 'null' > "$tmp/rust.json"
else
  echo "== bert2bert bench ==" >&2
  "$BERT2BERT" bench --model "$MODEL" --batch "$B" --src-len "$S" --tgt-len "$T" --steps "$STEPS" --device cpu --json \
    > "$tmp/rust.out"
  # the contract is one JSON object on stdout; take the last line that parses, in case of stray output
  "$PYTHON" - "$tmp/rust.out" > "$tmp/rust.json" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
try:
    obj = json.loads(text)
except ValueError:
    obj = None
for line in ([] if isinstance(obj, dict) else text.splitlines()):
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            pass
if obj is None:
    sys.exit("bert2bert bench printed no JSON object on stdout")
print(json.dumps(obj))
EOF
fi

echo "== pytorch ==" >&2
"$PYTHON" "$here/pytorch_cpu.py" --model "$MODEL" --batch "$B" --src-len "$S" --tgt-len "$T" \
  --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --json > "$tmp/pytorch.json"

mkdir -p "$here/results"
out="$here/results/cpu-$(date -u +%Y%m%dT%H%M%SZ).json"
"$PYTHON" - "$tmp/rust.json" "$tmp/pytorch.json" "$out" "$MODEL" "$B" "$S" "$T" "$STEPS" "$(nproc)" <<'EOF'
import json, platform, sys
rust_f, py_f, out, model, B, S, T, steps, cores = sys.argv[1:]
rust = json.load(open(rust_f))
py = json.load(open(py_f))

def num(d, k):
    v = (d or {}).get(k)
    return v if isinstance(v, (int, float)) else None

rows = [("step ms (median)", "step_ms_median", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_bytes", None)]
print(f"config: batch {B}, src {S}, tgt {T}, {steps} timed steps, {cores} cores, model {model}")
print(f"{'':<18} {'bert2bert':>12} {'pytorch':>12}")
for label, key, fmt in rows:
    cells = []
    for d in (rust, py):
        v = num(d, key)
        if v is None:
            cells.append("-")
        elif fmt is None:
            cells.append(f"{v / 2**20:.0f}")
        else:
            cells.append(fmt.format(v))
    print(f"{label:<18} {cells[0]:>12} {cells[1]:>12}")
r_ms, p_ms = num(rust, "step_ms_median"), num(py, "step_ms_median")
speedup = p_ms / r_ms if r_ms and p_ms else None
print("speedup (pytorch_ms / bert2bert_ms): " + (f"{speedup:.2f}" if speedup is not None else "n/a"))
record = {"config": {"model": model, "batch": int(B), "src_len": int(S), "tgt_len": int(T), "steps": int(steps),
                     "cores": int(cores), "machine": platform.machine()},
          "bert2bert": rust, "pytorch": py, "speedup": speedup}
with open(out, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
print(f"saved {out}")
EOF
