#!/usr/bin/env bash
# The main job: train inverse adversarial training on real MNIST (eps 0.3) and evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh demo
.venv/bin/iat data fetch mnist --root data
.venv/bin/iat train --config configs/mnist-demo.toml --data-dir data --out runs/mnist-iat --overwrite
.venv/bin/iat eval runs/mnist-iat --attacks natural,pgd20
echo "demo finished in $(( $(date +%s) - start )) s"
