#!/usr/bin/env bash
# The test command (CI runs exactly this through .ci/run): formatting, then every test of the
# workspace. Needs only cargo; nothing here downloads models or needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
cargo test --workspace --locked
