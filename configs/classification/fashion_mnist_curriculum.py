"""Pretraining a fixed-size ViT faster with a patch-size curriculum (paper Sec. 5.4, Fig. 12), on the embedded data.

    python -m tools.train --config configs/classification/fashion_mnist_curriculum.py:curriculum=none --workdir W
    python -m tools.train --config configs/classification/fashion_mnist_curriculum.py:curriculum=coarse_to_fine ...

The model is a standard ViT of the target patch size (its kernel and position grid are those of ``target``, as
``fashion_mnist.py:fixed=P``); a curriculum runs the early steps at larger, cheaper patch sizes through PI-resize and
ends at the target, which is what the model is evaluated at. Every curriculum gets the **same training compute** as
``curriculum=none`` (``budget`` steps at the target size): a step at patch size p costs ``step_flops(p)``, so a
stage spending a fraction f of the budget at p runs ``f * budget * step_flops(target) / step_flops(p)`` steps.

Arguments (comma-separated, after a colon):
    curriculum=NAME   none | coarse_to_fine | uniform_then_target (see CURRICULA)
    target=P          the deployed patch size (default 8: a 6x6 grid on 48 px)
    budget=S          the compute, in steps at the target size (default 600)
    runlocal          a few steps of a tiny model (smoke tests)

The paper's own curricula are in its Appendix H, which is not part of the text this project has: these are ours,
of the form the paper describes (a sequence of patch-size distributions with the last one on the target size).
"""

import functools

import torch

from configs.classification.common import base_config, parse_arg

IMAGE_SIZE, WIDTH, DEPTH = 48, 128, 4  # the main job's FlexiViT-mu shape on 48 px Fashion-MNIST

# name -> stages: (fraction of the compute, patch sizes drawn uniformly in that stage); the last is the target alone.
CURRICULA = {
    "none": [(1.0, None)],
    "coarse_to_fine": [(0.25, [16]), (0.25, [12]), (0.5, None)],
    "uniform_then_target": [(0.5, [16, 12, 8]), (0.5, None)],
}


@functools.cache
def step_flops(patch: int, target: int = 8, width: int = WIDTH, depth: int = DEPTH) -> float:
    """Forward FLOPs of one image at ``patch`` for the ViT of patch size ``target``, counted on the model itself
    (tools/lib/profiling.py; the training step costs a fixed multiple of it). Counting, rather than a formula,
    includes the patch embedding's real path (above the kernel size the patches are resized, not the kernel)."""
    import flexivit
    from tools.lib.profiling import count_gflops_fn

    model = flexivit.create_model("flexivit_mu", width=width, depth=depth, base_patch_size=target,
                                  posemb_grid=IMAGE_SIZE // target, num_classes=10)  # fmt: skip
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return 1e9 * count_gflops_fn(lambda x: model(x, patch_size=patch), example)


def curriculum_stages(name: str, target: int, budget: int) -> tuple[list, int]:
    """``(sampler stages, total steps)`` of curriculum ``name`` with the compute of ``budget`` steps at ``target``."""
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; choose from {', '.join(CURRICULA)}")
    stages, start = [], 0
    for fraction, sizes in CURRICULA[name]:
        sizes = sizes or [target]
        mean_cost = sum(step_flops(p, target) for p in sizes) / len(sizes)  # uniform draws: expected cost per step
        steps = round(fraction * budget * step_flops(target, target) / mean_cost)
        kind = "fixed" if len(sizes) == 1 else "uniform"
        stages.append((start, dict(kind=kind, sizes=sizes)))
        start += steps
    return stages, start


def get_config(arg=None):
    args = parse_arg(arg, allowed=("curriculum", "target", "budget", "runlocal"))
    name, target, budget = args.get("curriculum", "none"), int(args.get("target", 8)), int(args.get("budget", 600))
    config = base_config()
    config.model.name = "flexivit_mu"
    config.model.overrides = dict(depth=DEPTH, base_patch_size=target, posemb_grid=IMAGE_SIZE // target,
                                  patch_size=target)  # fmt: skip
    config.data.update(name="fashion_mnist", image_size=IMAGE_SIZE, crop_scale=[1.0, 1.0], hflip=True,
                       eval_crop_ratio=1.0)  # fmt: skip
    stages, steps = curriculum_stages(name, target, budget)
    config.patch_sizes = dict(kind="curriculum", sizes=[target], stages=stages)
    config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=50, clip_norm=1.0)
    config.train.update(steps=steps, batch_size=128, precision="bf16", log_every=25, ckpt_every=250)
    config.eval.update(patch_sizes=[target], batch_size=500, every=0)
    if args.get("runlocal"):
        config.model.overrides.update(depth=1, width=32, num_heads=2)
        config.data.update(train_examples=256, val_examples=64, image_size=24)
        config.model.overrides.update(posemb_grid=24 // target)
        stages, _ = curriculum_stages(name, target, 4)
        config.patch_sizes = dict(kind="curriculum", sizes=[target], stages=[(s, spec) for s, spec in stages])
        config.train.update(steps=6, batch_size=32, precision="fp32", log_every=1, ckpt_every=3)
        config.eval.update(batch_size=32)
    return config
