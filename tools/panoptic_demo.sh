#!/usr/bin/env bash
# UViM panoptic segmentation on the embedded default (docs/panoptic.md): the generated Fashion-MNIST scenes in COCO
# panoptic format. Stage I trains the oracle (patch 8) and reports its PQ, the upper bound; stage II predicts its
# codes from the image with the main job's FlexiViT as encoder, two ways:
#   flexified   a random patch size from {16, 12, 8, 6, 4} per step
#   fixed-p16   patch 16 only, evaluated at all sizes
# PQ / SQ / RQ, GFLOPs and img/s per patch size: runs/panoptic_eval/.
#   bash tools/panoptic_demo.sh          (interrupted runs resume; the main job runs first when missing)
source "$(dirname "$0")/demo_env.sh"  # repository root, $py, the main job's backbone
config=configs/panoptic/scenes.py
$py -m tools.train --config "$config:stage=1" --workdir runs/uvim_oracle --resume
$py -m tools.train --config "$config:stage=2" --workdir runs/uvim_flexi --resume \
  --set model.oracle=runs/uvim_oracle eval.final=False
$py -m tools.train --config "$config:stage=2,fixed=16" --workdir runs/uvim_p16 --resume \
  --set model.oracle=runs/uvim_oracle eval.final=False
$py -m tools.eval --workdir runs/uvim_flexi runs/uvim_p16 --names flexified fixed-p16 \
  --out runs/panoptic_eval
