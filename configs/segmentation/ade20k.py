"""ADE20k (150 classes) with Segmenter's linear decoder on FlexiViT-B, fixed or flexified (paper Sec. 4, Fig. 7).

    python -m tools.train --config configs/segmentation/ade20k.py --workdir runs/ade20k_flexi \\
        --set data.root=/data/ADEChallengeData2016
    python -m tools.train --config configs/segmentation/ade20k.py:fixed=30 --workdir runs/ade20k_p30 ...
    python -m tools.eval --workdir runs/ade20k_flexi runs/ade20k_p30 --names flexified fixed-p30

Arguments: ``fixed=P`` fixed transfer at patch size P (evaluated at all sizes: fast transfer when P is large);
``crop=480`` trains and slides 480 px windows, which every paper patch size tiles (512 is tiled by 16 and 8 only, the
others are padded); ``runlocal`` a CPU smoke run on generated scenes in the ADE20k layout.

Recipe (docs/reference.md §9, mmseg segmenter_vit-s 512x512 160k / Segmenter): crop 512, batch 8, 160k iterations
(Segmenter: 64 epochs), SGD 0.001 with momentum 0.9, no weight decay, poly 0.9, drop path 0.1, random resize of
(2048, 512) by 0.5-2.0, sliding window 512 / stride 512. Reference: Segmenter-Linear ViT-S/16 45.75 mIoU (mmseg).
"""

from configs.segmentation.common import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, allowed=("crop", "fixed", "runlocal"))
    config = base_config()
    config.model.update(name="flexivit_base", init="flexivit_b_i21k_300ep", overrides=dict(drop_path_rate=0.1))
    crop = int(args.get("crop", 512))
    config.data.update(name="ade20k", image_size=crop, train_split="training", val_split="validation")
    config.model.inference.update(crop=crop, stride=crop)
    return apply_common_args(config, args, "ade20k")
