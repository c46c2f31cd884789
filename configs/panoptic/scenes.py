"""The embedded default: UViM panoptic segmentation of the generated Fashion-MNIST scenes (COCO panoptic files).

    python -m tools.train --config configs/panoptic/scenes.py:stage=1 --workdir runs/uvim_oracle
    python -m tools.train --config configs/panoptic/scenes.py:stage=2 --workdir runs/uvim_flexi \
        --set model.oracle=runs/uvim_oracle
    python -m tools.train --config configs/panoptic/scenes.py:stage=2,fixed=16 --workdir runs/uvim_p16 \
        --set model.oracle=runs/uvim_oracle

Arguments (comma-separated, after a colon):
    stage=1|2   the oracle (stage I, one patch size) or the image-to-codes model (stage II, flexible)
    fixed=P     stage II at patch size P only
    runlocal    tiny models on a few 48 px scenes, seconds on a CPU (smoke tests)

Data: the segmentation demo's 96 px scenes (``data/scenes``; ten thing classes and two stuff classes, every segment
an instance). Stage II's encoder starts from the main job's FlexiViT-mu (``runs/fashion_mnist``).
"""

from configs.panoptic.common import base_config, parse_arg
from configs.segmentation.common import runlocal_root

PATCH_SIZES = [16, 12, 8, 6, 4]


def get_config(arg=None):
    args = parse_arg(arg, allowed=("stage", "fixed", "runlocal"))
    stage = int(args.get("stage", 1))
    config = base_config(stage)
    config.model.update(
        patch_size=8, code_len=36, dict_size=512, width=64, enc_depth=2, dec_depth=2, num_heads=4,
        code_dropout="random",
        name="flexivit_mu", init="runs/fashion_mnist",
        overrides=dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=16),
        decoder_width=128, decoder_depth=2, decoder_heads=4,
    )  # fmt: skip
    config.data.update(
        root="data/scenes",
        train_split="training",
        val_split="validation",
        image_size=96,
        crop_area=[0.5, 1.0],
        max_instances=8,  # a scene has at most 5 things and 2 stuff regions
        num_workers=0,
        generate=dict(num_train=2000, num_val=200, seed=0, size=96),
    )
    config.optim.update(lr=1e-3, warmup_steps=50)
    # fp32: the docs' numbers (CPUs with AMX / avx512_bf16 train ~2x faster with --set train.precision=bf16).
    config.train.update(steps=1000, batch_size=16, precision="fp32", log_every=25, ckpt_every=250)
    config.eval.update(batch_size=50, every=0)
    if stage == 1:
        config.patch_sizes = dict(kind="fixed", sizes=[8])
        config.eval.patch_sizes = [8]
        config.train.steps = 3000  # the oracle bounds what stage II can reach (docs/panoptic.md)
    else:
        config.patch_sizes = dict(kind="uniform", sizes=PATCH_SIZES)
        config.eval.patch_sizes = list(PATCH_SIZES)
        if "fixed" in args:
            config.patch_sizes = dict(kind="fixed", sizes=[int(args["fixed"])])
    if args.get("runlocal"):
        root = runlocal_root("ade20k")  # the segmentation smoke runs' scenes (every format is written)
        config.model.update(
            patch_size=8, code_len=4, dict_size=16, width=32, enc_depth=1, dec_depth=1, num_heads=2,
            init=None, overrides=dict(depth=1, width=32, num_heads=2, base_patch_size=16, posemb_grid=7, patch_size=16),
            decoder_width=32, decoder_depth=1, decoder_heads=2,
        )  # fmt: skip
        config.data.update(root=root, image_size=48, generate=dict(num_train=16, num_val=4, seed=0, size=48))
        config.train.update(steps=4, batch_size=4, precision="fp32", log_every=1, ckpt_every=2)
        config.eval.update(batch_size=4)
        if stage == 2:
            sizes = [16, 12, 8] if "fixed" not in args else config.patch_sizes.sizes
            config.patch_sizes = dict(kind=config.patch_sizes.kind, sizes=sizes)
            config.eval.patch_sizes = [16, 12, 8]
    return config
