#!/usr/bin/env bash
# The main job on the embedded default: train a small FlexiViT flexibly from scratch on Fashion-MNIST (real data,
# shipped offline), then evaluate it at every patch size and write the table and plot.
#   bash tools/main.sh [WORKDIR [KEY=VALUE ...]]   (default runs/fashion_mnist; an interrupted run resumes)
#   bash tools/main.sh runs/fashion_mnist train.precision=fp32   (a CPU without bf16 units: README "Results")
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs/fashion_mnist}
shift || true  # the rest: config overrides for tools.train
bash tools/setup.sh
.venv/bin/python -m tools.train --config configs/classification/fashion_mnist.py --workdir "$workdir" --resume \
  --set eval.final=False "$@"  # tools.eval below sweeps every patch size
.venv/bin/python -m tools.eval --workdir "$workdir" --names FlexiViT-mu
