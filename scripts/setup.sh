#!/usr/bin/env bash
# Create .venv and install iat into it (CPU torch 2.13.0 pinned; see requirements-cpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's notes about this machine's local index folders are noise to a user; real errors still show.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt -e ".[$1]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
