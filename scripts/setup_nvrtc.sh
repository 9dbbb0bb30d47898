#!/usr/bin/env bash
# Installs NVRTC (the CUDA run-time compiler) and the CUDA headers from pinned PyPI wheels into
# .deps/cuda13, so the kernel compile checks (kernels/tests/nvrtc.rs) run without a GPU or a CUDA
# toolkit. Idempotent: a second run only rewrites the env file.
#
# Writes .deps/cuda13/env.sh and prints the same export lines on stdout, so either of these works:
#   scripts/setup_nvrtc.sh && . .deps/cuda13/env.sh
#   eval "$(scripts/setup_nvrtc.sh)"
# Everything else (pip's progress) goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

NVRTC_VERSION=13.0.88
RUNTIME_VERSION=13.0.96
PYTHON=${PYTHON:-python3}
dest="$root/.deps/cuda13"
stamp="$dest/.installed"
want="nvidia-cuda-nvrtc==$NVRTC_VERSION nvidia-cuda-runtime==$RUNTIME_VERSION"

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup_nvrtc: installing $want into .deps/cuda13" >&2
  mkdir -p "$root/.deps"
  tmp=$(mktemp -d "$root/.deps/cuda13.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # shellcheck disable=SC2086 # $want is two requirement words on purpose
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    --only-binary=:all: --target "$tmp" $want >&2
  printf '%s' "$want" >"$tmp/.installed"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
fi

# The wheels' layout (checked for 13.0.88 / 13.0.96): nvidia/cu13/{lib,include}. Look the
# library up rather than trusting that, so a layout change fails here with a clear message.
nvrtc=$(find "$dest" -name 'libnvrtc.so*' ! -name '*builtins*' ! -name '*.alt.*' -print 2>/dev/null | sort | head -n 1)
if [[ -z "$nvrtc" ]]; then
  echo "setup_nvrtc: no libnvrtc.so* under $dest (wheel layout changed?)" >&2
  exit 1
fi
lib=$(dirname "$nvrtc")
include=$(dirname "$(find "$dest" -name cuda_bf16.h -print | head -n 1)")
if [[ ! -f "$include/cuda_bf16.h" ]]; then
  echo "setup_nvrtc: no cuda_bf16.h under $dest (wheel layout changed?)" >&2
  exit 1
fi
# The wheel ships only versioned names (libnvrtc.so.13). cudarc 0.19 tries libnvrtc.so.13 among
# its candidates, but the unversioned name is what every other loader tries first.
if [[ ! -e "$lib/libnvrtc.so" ]]; then
  ln -s "$(basename "$nvrtc")" "$lib/libnvrtc.so"
fi

case ":${LD_LIBRARY_PATH:-}:" in
  *":$lib:"*) ld_path=${LD_LIBRARY_PATH} ;;
  *) ld_path="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
cat >"$dest/env.sh" <<EOF
# Written by scripts/setup_nvrtc.sh: NVRTC and the CUDA headers from pip wheels.
case ":\${LD_LIBRARY_PATH:-}:" in
  *":$lib:"*) ;;
  *) export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" ;;
esac
export BERT2BERT_CUDA_INCLUDE="$include"
EOF
printf 'export LD_LIBRARY_PATH=%q\n' "$ld_path"
printf 'export BERT2BERT_CUDA_INCLUDE=%q\n' "$include"
