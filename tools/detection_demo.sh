#!/usr/bin/env bash
# Open-vocabulary detection on the embedded default (docs/detection.md): OWL-ViT heads on the FlexiLiT of the
# contrastive demo, trained on generated scenes of real Fashion-MNIST items with three classes held out as "rare"
# (never in detection training, so APr is zero-shot), two ways:
#   flexified   a random patch size from {16, 12, 8, 6, 4} per step
#   fixed-p16   the largest (cheapest) patch size only, evaluated at all sizes
# plus the baseline that shows APr comes from the text queries: the flexified model queried with the rare classes'
# names permuted among themselves. LVIS AP / APr, GFLOPs and img/s per patch size: runs/detection_eval/.
#   bash tools/detection_demo.sh          (interrupted runs resume; the towers are trained first when missing)
source "$(dirname "$0")/demo_env.sh"  # repository root, $py, the main job's backbone
# The text tower: the contrastive demo's FlexiLiT, trained against the main job's image tower.
if ! ls runs/flexilit/checkpoints/ckpt_00000400.pt >/dev/null 2>&1; then
  $py -m tools.train --config configs/contrastive/fashion_mnist.py:mode=flexilit --workdir runs/flexilit --resume
fi
# The data: 2000 + 200 generated scenes (LVIS-format JSON among others), ~15 s; the config writes them if missing.
config=configs/detection/scenes.py
$py -m tools.train --config "$config" --workdir runs/det_scenes_flexi --resume --set eval.final=False
$py -m tools.train --config "$config:fixed=16" --workdir runs/det_scenes_p16 --resume --set eval.final=False
$py -m tools.eval --workdir runs/det_scenes_flexi runs/det_scenes_p16 --names flexified fixed-p16 \
  --out runs/detection_eval
$py -m tools.eval --workdir runs/det_scenes_flexi --config "$config:shuffled_rare" --names flexified-rare-names-shuffled \
  --out runs/detection_eval_shuffled --no-timing
