"""Cityscapes (19 classes, gtFine) with Segmenter's linear decoder on FlexiViT-B, fixed or flexified (paper Sec. 4).

    python -m tools.train --config configs/segmentation/cityscapes.py --workdir runs/cityscapes_flexi \\
        --set data.root=/data/cityscapes
    python -m tools.eval --workdir runs/cityscapes_flexi

The root holds ``leftImg8bit/`` and ``gtFine/``; ``*_gtFine_labelTrainIds.png`` are used where present, else the
official ``*_gtFine_labelIds.png`` are mapped to train ids with the standard table (tasks/segmentation/data.py).

Arguments: ``fixed=P`` fixed transfer at patch size P; ``runlocal`` a CPU smoke run on generated scenes written in
the Cityscapes layout (label ids, converted on reading).

Recipe (Segmenter's Cityscapes setting, docs/reference.md §9): crop 768, batch 8, 80k iterations (216 epochs), SGD 0.01
with momentum 0.9, no weight decay, poly 0.9, random resize of (2048, 1024) by 0.5-2.0, images evaluated at
2048x1024 with a sliding window of 768 / stride 512. 768 is tiled by 48, 24, 16, 12 and 8; other sizes are padded.
"""

from configs.segmentation.common import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, allowed=("fixed", "runlocal"))
    config = base_config()
    config.model.update(name="flexivit_base", init="flexivit_b_i21k_300ep", overrides=dict(drop_path_rate=0.1))
    config.model.inference.update(mode="slide", crop=768, stride=512)
    config.data.update(
        name="cityscapes",
        train_split="train",
        val_split="val",
        image_size=768,
        scale=[2048, 1024],
        test_scale=[2048, 1024],
    )
    config.optim.update(lr=0.01)
    config.train.update(steps=80_000, ckpt_every=4000)
    return apply_common_args(config, args, "cityscapes")
