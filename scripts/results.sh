#!/usr/bin/env bash
# Regenerate docs/results.md's tables: run (or continue) each CPU-scale table, keep a copy of its run
# directories without checkpoints in docs/results/runs/, and paste the tables into docs/results.md.
#   scripts/results.sh                      # all seven tables, 2 cells at a time (hours on 2 cores)
#   RUNS=/big/disk scripts/results.sh c3-cifar10-jpeg
#   EXPORT_ONLY=1 scripts/results.sh        # no training: copy what is finished in $RUNS, rebuild the tables
#   TABLE_ONLY=1 scripts/results.sh         # no training: rebuild the tables from docs/results/runs/
set -euo pipefail
cd "$(dirname "$0")/.."
tables=("$@")
[ ${#tables[@]} -eq 0 ] && tables=(c1c2-cifar10-jpeg c1c2-fashion-mnist c3-cifar10-jpeg c3-cifar10-jpeg-noisy anchor-fashion-mnist anchor-fashion-mnist-6ep anchor-fashion-mnist-cekl)
runs=${RUNS:-runs/reproduce}
iat=${IAT:-.venv/bin/iat}
for t in "${tables[@]}"; do
  if [ -z "${TABLE_ONLY:-}" ]; then
    [ -z "${EXPORT_ONLY:-}" ] && "$iat" reproduce "$t" --out "$runs/$t" --jobs "${JOBS:-2}" --threads 1
    mkdir -p "docs/results/runs/$t"
    # everything but the weights: config.json, metrics.jsonl, eval-*.json (per-example outcomes), logs
    (cd "$runs/$t" && find . -path '*/checkpoints' -prune -o -type f \( -name '*.json' -o -name '*.jsonl' \
      -o -name '*.log' -o -name '*.csv' -o -name '*.md' \) -print0) |
      while IFS= read -r -d '' f; do install -D -m 644 "$runs/$t/$f" "docs/results/runs/$t/$f"; done
  fi
  "$iat" reproduce "$t" --out "docs/results/runs/$t" --table-only --results-md docs/results.md
done
