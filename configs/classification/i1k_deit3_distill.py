"""FlexiViT-{S,B} distilled on ImageNet-1k from a DeiT-III teacher at 384 px (big_vision's i1k_deit3_distill).

Needs ImageNet-1k as an image folder (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``) and the DeiT-III
weights as a local timm state dict (e.g. timm's ``deit3_base_patch16_384.fb_in1k`` saved as .safetensors; its
LayerScale is folded into the blocks when loading). On 8 GPUs:

    torchrun --nproc_per_node 8 -m tools.train --config configs/classification/i1k_deit3_distill.py:variant=base \\
        --workdir runs/i1k_deit3_distill_b --set data.root=/data/imagenet distill.init=/weights/deit3_b_384.safetensors

Recipe (big_vision): 90 epochs at batch 1024, Adam lr 1e-4 with 5k warmup steps and cosine decay, gradient clip
1.0, mixup on every batch, student and teacher at 16x16 patches, the student at 240 px and initialised from the
teacher, the teacher on its own 384 px resize of the student's crop, with its ImageNet normalisation (weight decay:
see common.big_vision_distill_config).
Expected (paper Fig. 2, 90 epochs for S): about 80 % top-1 at patch 16 for S and a smooth curve over patch sizes.
"""

from configs.classification.common import big_vision_distill_config, distill_config, parse_arg
from configs.classification.fashion_mnist import get_config as fashion_mnist_config

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
    args = parse_arg(arg, allowed=("variant", "epochs", "runlocal"))
    variant = args.get("variant", "base")
    if args.get("runlocal"):  # the recipe's plumbing on the embedded data, seconds on a CPU
        return _runlocal(fashion_mnist_config("runlocal"))
    # timm's DeiT-III weights expect ImageNet mean / std; the student sees [-1, 1] (big_vision's convention).
    teacher = distill_config(
        name=f"vit_{variant}_patch16",
        patch_size=16,
        image_size=384,
        value_range="imagenet",
        overrides=dict(posemb_grid=24),
    )
    config = big_vision_distill_config(
        f"flexivit_{variant}",
        train_images=IMAGENET_TRAIN,
        batch=1024,
        epochs=int(args.get("epochs", 90)),
        num_workers=8,
        teacher=teacher,
    )
    # distill.init: the DeiT-III weights, required: --set distill.init=/path/to/deit3_{variant}_384.safetensors
    return config


def _runlocal(config):
    config.distill = distill_config(
        name="vit_mu_patch8",
        patch_size=8,
        image_size=32,
        value_range="imagenet",
        overrides=dict(depth=1, width=32, num_heads=2, posemb_grid=4, num_classes=10),
    )
    config.train.mixup = 1.0
    return config
