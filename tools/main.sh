#!/usr/bin/env bash
# The main job on the embedded default: train a small FlexiViT flexibly from scratch on Fashion-MNIST (real data,
# shipped offline), then evaluate it at every patch size and write the table and plot.
#   bash tools/main.sh [WORKDIR]        (default runs/fashion_mnist; an interrupted run resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-runs/fashion_mnist}
bash tools/setup.sh
.venv/bin/python -m tools.train --config configs/classification/fashion_mnist.py --workdir "$workdir" --resume \
  --set eval.final=False  # tools.eval below sweeps every patch size
.venv/bin/python -m tools.eval --workdir "$workdir" --names FlexiViT-mu
