#!/usr/bin/env bash
# Semantic segmentation on the embedded default (docs/segmentation.md): FlexiViT-mu from the classification main job,
# transferred with Segmenter's linear decoder to scenes made of real Fashion-MNIST items, three ways:
#   flexified      a random patch size from {16, 12, 8, 6, 4} per step
#   fast transfer  fixed at the largest patch size, 16 (the cheapest), then evaluated at all sizes (paper Fig. 8)
#   fast transfer + consistency   the same, with predictions at a random other size pulled towards those at 16
# all evaluated at every patch size (mIoU, GFLOPs, img/s: runs/segmentation_eval/sweep.{csv,md,png}).
#   bash tools/segmentation_demo.sh          (about 15 minutes on 2 CPU cores after the main job's ~13; interrupted runs resume)
source "$(dirname "$0")/demo_env.sh"  # repository root, $py, the main job's backbone
# The data: 2000 + 200 generated scenes in the ADE20k layout (plus COCO / LVIS / panoptic annotations), ~15 s.
if [ ! -f data/scenes/scenes.json ]; then
  $py -m tools.make_scenes --out data/scenes --num-train 2000 --num-val 200 --seed 0
fi

$py -m tools.train --config configs/segmentation/scenes.py --workdir runs/seg_scenes_flexi --resume
$py -m tools.train --config configs/segmentation/scenes.py:fixed=16 --workdir runs/seg_scenes_p16 --resume
$py -m tools.train --config configs/segmentation/scenes.py:fixed=16 --workdir runs/seg_scenes_p16_cons --resume \
  --set "train.consistency.weight=1.0" "train.consistency.sizes=[12, 8, 6, 4]"
$py -m tools.eval --workdir runs/seg_scenes_flexi runs/seg_scenes_p16 runs/seg_scenes_p16_cons \
  --names flexified fast-transfer-p16 fast-transfer-p16+consistency --out runs/segmentation_eval
# mIoU against cost (tools.eval plots the first metric column it finds; this plots mIoU explicitly).
$py - <<'PY'
import csv
from tools.lib.reporting import plot_sweep

rows = list(csv.DictReader(open("runs/segmentation_eval/sweep.csv")))
plot_sweep(rows, "runs/segmentation_eval/sweep_miou.png", metric="mIoU", title="mIoU and cost per patch size")
print("wrote runs/segmentation_eval/sweep_miou.png")
PY
