"""A small FlexiViT trained from scratch on Fashion-MNIST (real data, shipped offline), flexibly or fixed.

The embedded default and the README's main job:

    python -m tools.train --config configs/classification/fashion_mnist.py --workdir runs/fashion_mnist
    python -m tools.eval --workdir runs/fashion_mnist

Arguments (comma-separated, after a colon):
    runlocal     a few steps of a tiny model, seconds on a CPU (smoke tests)
    fixed=P      a standard ViT trained at patch size P only (the paper's Fig. 3 baselines)

48 px images are tiled by the patch sizes 16, 12, 8, 6 and 4 (grids 3 to 12, a 4x range), the analogue of the
paper's 240 px with patches 48 to 8. The underlying kernel is 16x16 and the position grid 7x7: as in the paper
(32x32 for 8..48), the kernel sits inside the range and is PI-resized on every step.

The recipe is tuned for about 10 minutes on 2 CPU cores (docs/main_job.md has what was tried and measured): the
first WARMUP_STEPS steps at the cheapest patch size only, then one patch size per step uniformly from all five (a
patch-size curriculum, paper Sec. 5.4 / Fig. 12), bf16 autocast, and no random crop (for a run of a few epochs the
crop costs more accuracy than it gains). ``runlocal`` and ``fixed=P`` keep the plain uniform or fixed sampler.
"""

from configs.classification.common import base_config, parse_arg

PATCH_SIZES = [16, 12, 8, 6, 4]
STEPS, WARMUP_STEPS = 3000, 1000  # all steps; steps at patch size 16 only before the uniform sampler takes over


def get_config(arg=None):
    args = parse_arg(arg, allowed=("fixed", "runlocal"))
    config = base_config()
    config.model.name = "flexivit_mu"
    config.model.overrides = dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=8)
    config.data.update(name="fashion_mnist", image_size=48, crop_scale=[1.0, 1.0], hflip=True, eval_crop_ratio=1.0)
    uniform = dict(kind="uniform", sizes=PATCH_SIZES)
    config.patch_sizes = dict(
        kind="curriculum",
        sizes=PATCH_SIZES,
        stages=[(0, dict(kind="fixed", sizes=[PATCH_SIZES[0]])), (WARMUP_STEPS, uniform)],
    )
    config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=100, clip_norm=1.0)
    # bf16 autocast: 2.3x faster steps than fp32 on this CPU (AMX); use train.precision=fp32 on a CPU without bf16.
    config.train.update(steps=STEPS, batch_size=128, precision="bf16", log_every=25, ckpt_every=250)
    config.eval.update(patch_sizes=[24, *PATCH_SIZES], batch_size=500, every=0)

    if "fixed" in args:
        patch = int(args["fixed"])
        config.patch_sizes = dict(kind="fixed", sizes=[patch])
        # A standard ViT stores its one patch size and the grid it gives (like vit_base_patch16).
        config.model.overrides.update(base_patch_size=patch, posemb_grid=48 // patch, patch_size=patch)
    if args.get("runlocal"):
        config.model.overrides.update(depth=1, width=32, num_heads=2)
        config.data.update(train_examples=256, val_examples=64, image_size=24)
        config.patch_sizes = dict(kind="uniform", sizes=[12, 8, 6]) if "fixed" not in args else config.patch_sizes
        config.train.precision = "fp32"  # the smoke tests compare runs to 1e-6
        if "fixed" in args:
            config.model.overrides.update(posemb_grid=24 // int(args["fixed"]))
        config.train.update(steps=4, batch_size=32, log_every=1, ckpt_every=2)
        config.eval.update(patch_sizes=[12, 8, 6], batch_size=32, every=0)
    return config
