"""FlexiViT-B distilled on ImageNet-21k from a ViT-B/8 teacher at 224 px (big_vision's i21k_distill, Sec. 3.5).

The paper's main model: the student starts at the teacher (kernel PI-resized to 32x32, posemb resized to 7x7) and
learns KL(student(x, p) || teacher(x)) with p uniform over the ten patch sizes at 240 px. Needs ImageNet-21k as an
image folder and the B/8 weights as a local .npz (big_vision) or timm file:

    torchrun --nproc_per_node 8 -m tools.train --config configs/classification/i21k_distill.py \\
        --workdir runs/i21k_distill --set data.root=/data/imagenet21k distill.init=/weights/vit_b8_i21k.npz

Recipe (big_vision): 90 epochs (300 and 1000 for the released models) at batch 4096, Adam lr 1e-4, 5k warmup steps,
cosine, gradient clip 1.0, mixup on every batch. Weight decay: see i1k_deit3_distill.py (1e-5 / lr = 0.1 here).
"""

from configs.classification.common import big_vision_distill_config, distill_config, parse_arg
from configs.classification.fashion_mnist import get_config as fashion_mnist_config
from configs.classification.i1k_deit3_distill import _runlocal

IMAGENET21K_TRAIN = 13_000_000  # roughly; set train.steps from your copy's size


def get_config(arg=None):
    args = parse_arg(arg, allowed=("epochs", "runlocal"))
    if args.get("runlocal"):
        return _runlocal(fashion_mnist_config("runlocal"))
    # The B/8 teacher sees 224 px (a 28x28 grid): its stored grid is 28x28.
    teacher = distill_config(name="vit_base_patch8", patch_size=8, image_size=224, overrides=dict(posemb_grid=28))
    config = big_vision_distill_config(
        "flexivit_base",
        train_images=IMAGENET21K_TRAIN,
        batch=4096,
        epochs=int(args.get("epochs", 90)),
        num_workers=16,
        teacher=teacher,
    )
    config.eval.every = 10000
    return config
