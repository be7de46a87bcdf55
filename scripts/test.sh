#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/lint.sh
# one worker per core (each with one torch thread, tests/conftest.py); a test file stays on one worker, since
# some files share a scratch folder between their tests in order (tests/test_readme_commands.py)
.venv/bin/python -m pytest -q -rs -n auto --dist loadfile "$@"  # -rs: each skipped test with its reason
