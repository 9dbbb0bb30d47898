#!/usr/bin/env bash
# Creates the Python virtual environment the tests use (.deps/py) from the pinned
# scripts/requirements-test.txt. Idempotent: it reinstalls only when that file changed.
# Prints the venv's python path on stdout; pip's output goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PYTHON=${PYTHON:-python3}
venv="$root/.deps/py"
req="$root/scripts/requirements-test.txt"
stamp="$venv/.requirements"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" ]] || ! cmp -s "$req" "$stamp"; then
  echo "setup_python: installing scripts/requirements-test.txt into .deps/py" >&2
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv" >&2
  if grep -qvE '^\s*(#|$)' "$req"; then
    PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      --only-binary=:all: -r "$req" >&2
  fi
  cp "$req" "$stamp"
fi
echo "$venv/bin/python"
