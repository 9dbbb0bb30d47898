#!/usr/bin/env bash
# Builds and runs the standalone test of cuda-emu/csrc/nccl.cpp (forked ranks, fake emu runtime).
# Usage: cuda-emu/csrc/test/run_nccl_test.sh   (from anywhere; needs g++ with C++17)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -f "$tmp/nccl_test"; rmdir "$tmp"' EXIT
out="$tmp/nccl_test"
cd "$root"
g++ -std=c++17 -O1 -Wall -Wextra -pthread -I cuda-emu/csrc cuda-emu/csrc/nccl.cpp cuda-emu/csrc/test/nccl_test.cpp \
    -o "$out"
"$out"
