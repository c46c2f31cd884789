"""Distil a fixed-patch ViT into a FlexiViT on Fashion-MNIST, the student initialised from the teacher (Sec. 3.5).

First train the teacher (a standard ViT at patch 8), then distil:

    python -m tools.train --config configs/classification/fashion_mnist.py:fixed=8 --workdir runs/teacher_p8
    python -m tools.train --config configs/classification/fashion_mnist_distill.py:teacher=runs/teacher_p8 \\
        --workdir runs/flexi_distilled

Arguments: ``teacher=WORKDIR`` (required except with runlocal), ``runlocal``, ``random_init`` (do not start the
student at the teacher, the paper's Fig. 5 ablation). The loss is the cross-entropy to the teacher's predictions
on the same augmented batch, at a random patch size per step.
"""

from configs.classification.common import distill_config, parse_arg
from configs.classification.fashion_mnist import PATCH_SIZES
from configs.classification.fashion_mnist import get_config as fashion_mnist_config


def get_config(arg=None):
    args = parse_arg(arg, allowed=("teacher", "random_init", "runlocal"))
    config = fashion_mnist_config("runlocal" if args.get("runlocal") else None)
    config.distill = distill_config(
        init=args.get("teacher"),
        patch_size=8,
        image_size=config.data.image_size,
        init_student="random_init" not in args,
    )
    if not args.get("runlocal"):
        # The student starts at the teacher: every patch size from the first step (no curriculum warm-up).
        config.patch_sizes = dict(kind="uniform", sizes=PATCH_SIZES)
    config.optim.update(lr=5e-4, warmup_steps=50)
    if args.get("runlocal") and not args.get("teacher"):
        # A random teacher of the runlocal shape stands in for a trained one: a smoke test of the plumbing.
        config.distill.update(
            name="vit_mu_patch8",
            patch_size=8,
            overrides=dict(depth=1, width=32, num_heads=2, posemb_grid=3, num_classes=10),
        )
    elif not args.get("teacher"):
        raise ValueError(
            "fashion_mnist_distill needs teacher=<workdir of a trained teacher>, e.g. :teacher=runs/teacher_p8"
        )
    return config
