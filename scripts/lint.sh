#!/usr/bin/env bash
# The static checks CI runs before the tests (scripts/test.sh): ruff (pyproject.toml's rule set, 120 columns),
# mypy on src/iat, and import-linter's layer and no-cycle contracts (docs/ARCHITECTURE.md). Each must report
# zero findings.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
"$bin/ruff" check --quiet src
"$bin/mypy" --no-error-summary
report=$("$bin/lint-imports" --no-cache) || { echo "$report"; exit 1; }   # its banner only when a contract breaks
echo "lint: ruff, mypy and import-linter report no findings"
