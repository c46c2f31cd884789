#!/usr/bin/env bash
# LiT vs FlexiLiT on the embedded default (paper Sec. 4 / 5.2, Fig. 10), on a CPU in minutes:
# a text tower trained against the locked Fashion-MNIST FlexiViT of the main job, once at patch size 16 only (LiT)
# and once at a random patch size in {16, 12, 8, 6, 4} per step (FlexiLiT); both evaluated at every patch size by
# zero-shot classification and image<->text retrieval. Writes runs/contrastive_eval/sweep.{csv,md,png}.
#   bash tools/contrastive_demo.sh        (interrupted runs resume; the main job runs first if it has not finished)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
if [ ! -f runs/fashion_mnist/eval/sweep.md ]; then  # written when the main job has finished
  echo "contrastive_demo: training the image tower first (bash tools/main.sh)"
  bash tools/main.sh
fi
config=configs/contrastive/fashion_mnist.py
.venv/bin/python -m tools.train --config "$config:mode=lit" --workdir runs/lit --resume
.venv/bin/python -m tools.train --config "$config:mode=flexilit" --workdir runs/flexilit --resume
.venv/bin/python -m tools.eval --workdir runs/lit runs/flexilit --names LiT FlexiLiT --out runs/contrastive_eval
