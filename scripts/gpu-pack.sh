#!/usr/bin/env bash
# Prepares, on the build machine, what scripts/gpu-check.sh needs on a GPU machine that has no cargo:
#   target/release/bert2bert   the release binary (built here; its debug line tables stripped in place)
#   .whl/                      the pinned NVRTC 13.0.88 (+ CUDA 13.0 headers), as a slim .tar.xz
#
#   cargo build --release && scripts/gpu-pack.sh [--no-strip] [--wheel]
#
# Why a slim tarball: the nvidia-cuda-nvrtc 13.0.88 wheel is 86 MiB (it carries two builds of libnvrtc), more than
# some ways of copying to the GPU machine allow; the tarball keeps only libnvrtc.so.13, libnvrtc-builtins.so.13.0
# and the headers (about 32 MiB). It is made from the pinned wheels that scripts/setup_nvrtc.sh installs into
# .deps/cuda13. --wheel instead downloads the wheel itself into .whl/ (gpu-check.sh accepts either).
# The binary's debug line tables are stripped in place (34 MiB -> 9 MiB, so binary + tarball stay under 64 MiB;
# backtraces keep function names but lose line numbers; the next cargo build that relinks restores them);
# --no-strip leaves it. Prints what to copy (the binary and all of .whl/) and its total size, and exits 1 when that is
# over 64 MiB, the most that can be copied to a GPU machine. BERT2BERT names another binary to strip and count.
set -euo pipefail
cd "$(dirname "$0")/.."

STRIP=1
WHEEL=0
for a in "$@"; do
  case "$a" in
    --no-strip) STRIP=0 ;;
    --wheel) WHEEL=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-pack: unknown argument $a" >&2; exit 2 ;;
  esac
done

NVRTC_VERSION=13.0.88
PYTHON=${PYTHON:-python3}
mkdir -p .whl

if [[ "$WHEEL" == 1 ]]; then
  # The wheel is tagged manylinux_2_12 (manylinux2010): a --platform of manylinux_2_28 finds nothing.
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_12_x86_64 -d .whl "nvidia-cuda-nvrtc==$NVRTC_VERSION" >&2
else
  slim=".whl/cuda13-nvrtc-$NVRTC_VERSION-slim.tar.xz"
  if [[ ! -f "$slim" ]]; then
    scripts/setup_nvrtc.sh >/dev/null
    cu=.deps/cuda13/nvidia/cu13
    for f in "$cu/lib/libnvrtc.so.13" "$cu/lib/libnvrtc-builtins.so.13.0" "$cu/include/cuda_bf16.h"; do
      [[ -f "$f" ]] || { echo "gpu-pack: $f missing (wheel layout changed?)" >&2; exit 1; }
    done
    echo "gpu-pack: writing $slim (xz, about a minute)" >&2
    tar -C .deps/cuda13 -cf - nvidia/cu13/lib/libnvrtc.so.13 nvidia/cu13/lib/libnvrtc-builtins.so.13.0 \
      nvidia/cu13/include .installed | xz -T0 -6 >"$slim.tmp"
    mv "$slim.tmp" "$slim"
  fi
fi

bin=${BERT2BERT:-target/release/bert2bert}
if [[ ! -x "$bin" ]]; then
  echo "gpu-pack: $bin not found: run cargo build --release first" >&2
  exit 1
fi
if [[ "$STRIP" == 1 ]]; then
  strip --strip-debug "$bin"
fi
# What is copied: the binary and everything in .whl/ (gpu-check.sh installs or unpacks all of it).
LIMIT=$((64 * 1024 * 1024))
total=0
echo "copy to the GPU machine, at the same paths under the repository root (with scripts/ and bench/):"
for f in "$bin" .whl/*; do
  [[ -f "$f" ]] || continue
  size=$(stat -L -c %s "$f")
  total=$((total + size))
  awk -v s="$size" -v f="$f" 'BEGIN { printf "  %8.1f MiB  %s\n", s / 1048576, f }'
done
awk -v s="$total" -v l="$LIMIT" 'BEGIN { printf "  %8.1f MiB  total (limit %.0f MiB)\n", s / 1048576, l / 1048576 }'
if ((total > LIMIT)); then
  echo "gpu-pack: $((total / 1048576)) MiB is more than the 64 MiB that can be copied to a GPU machine." >&2
  echo "gpu-pack: keep only the slim tarball in .whl/ (no --wheel, no other files) and the stripped binary" \
    "(no --no-strip)." >&2
  exit 1
fi
