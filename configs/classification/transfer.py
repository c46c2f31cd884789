"""Transfer a pretrained (Flexi)ViT to the paper's classification datasets at 240 px (Sec. 4, 4.2, 5.1).

    python -m tools.train --config configs/classification/transfer.py:dataset=cifar100,patch=30 \\
        --workdir runs/cifar100_p30 --set data.root=/data model.init=flexivit_b_i21k_300ep
    python -m tools.eval --workdir runs/cifar100_p30 --patch-sizes 48 40 30 24 20 16 15 12 10 8

Arguments: ``dataset=`` one of DATASETS; ``patch=P`` fixed transfer at patch size P (the paper's fast transfer at
P=30, evaluated at every size), or ``flexi`` for flexified transfer (a random size per step, Sec. 5.1);
``lr=`` for the paper's small learning-rate sweep; ``runlocal`` for a CPU smoke test on Fashion-MNIST.

Recipe (docs/reference.md §6): SGD with momentum 0.9, no weight decay, cosine decay after a linear warmup, gradient
clipping at 1.0, batch 512, a fresh zero-initialised head; step counts follow the BiT-HyperRule by dataset size.
"""

from configs.classification.common import base_config, parse_arg
from configs.classification.fashion_mnist import get_config as fashion_mnist_config
from flexivit import PAPER_PATCH_SIZES

# dataset -> (torchvision split names (train, eval), training steps, warmup steps)
DATASETS = {
    "cifar10": (("train", "test"), 10_000, 500),
    "cifar100": (("train", "test"), 10_000, 500),
    "oxford_iiit_pet": (("train", "test"), 500, 100),
    "flowers102": (("train", "test"), 500, 100),
    "food101": (("train", "test"), 10_000, 500),
    "imagefolder": (("train", "val"), 10_000, 500),  # e.g. ImageNet-1k (the paper's Fig. 8 transfer) or your data
}


def get_config(arg=None):
    args = parse_arg(arg, allowed=("dataset", "model", "patch", "lr", "flexi", "runlocal"))
    base = fashion_mnist_config("runlocal") if args.get("runlocal") else None
    config = base_config() if base is None else base
    if base is None:
        dataset = args.get("dataset", "cifar10")
        if dataset not in DATASETS:
            raise ValueError(f"unknown transfer dataset {dataset!r}; choose from {', '.join(DATASETS)}")
        (train_split, val_split), steps, warmup = DATASETS[dataset]
        config.model.name = args.get("model", "flexivit_base")
        config.model.init = "flexivit_b_i21k_300ep"  # any release name, .npz, timm file or workdir
        config.model.new_head = True
        config.data.update(name=dataset, train_split=train_split, val_split=val_split, image_size=240, num_workers=8)
        config.train.update(steps=steps, batch_size=512, ckpt_every=1000)
        config.optim.update(
            name="sgd",
            lr=float(args.get("lr", 0.01)),
            momentum=0.9,
            weight_decay=0.0,
            warmup_steps=warmup,
            schedule="cosine",
            clip_norm=1.0,
        )
        config.eval.update(patch_sizes=list(PAPER_PATCH_SIZES), every=0)
        sizes = list(PAPER_PATCH_SIZES)
    else:
        config.optim.update(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, warmup_steps=1)
        sizes = list(config.patch_sizes.sizes)
    if args.get("flexi"):
        config.patch_sizes = dict(kind="uniform", sizes=sizes)
    else:
        config.patch_sizes = dict(kind="fixed", sizes=[int(args.get("patch", 30 if base is None else sizes[0]))])
    return config
