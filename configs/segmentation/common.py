"""The full set of segmentation config keys with their defaults (the ADE20k recipe); dataset configs change the rest.

Every key a config may set exists here, so ``--set`` can reject typos (tasks/common/config.py).
Recipe (Segmenter / mmseg, docs/reference.md §9): SGD momentum 0.9, no weight decay, poly decay (power 0.9), batch 8,
random resize 0.5-2.0 + crop + flip + photometric jitter, sliding-window evaluation at the crop size.
"""

import tempfile
from pathlib import Path

from configs.common import engine_config, parse_arg  # noqa: F401  (parse_arg re-exported for the dataset configs)
from tasks.common.config import Config


def base_config() -> Config:
    config = Config(
        task="segmentation",
        model=dict(
            name="flexivit_base",
            init=None,  # .npz / timm / our checkpoint / workdir, or an official release name
            overrides={},  # FlexiViT keyword arguments, e.g. {"drop_path_rate": 0.1}
            decoder_dropout=0.0,
            # tasks.segmentation.InferenceSettings: "whole" or "slide" (crop / stride in pixels), flip, scales.
            inference=dict(mode="slide", crop=512, stride=512, flip=False, scales=[1.0]),
        ),
        data=dict(
            name="ade20k",  # ade20k | cityscapes | folder (tasks/segmentation/data.py)
            root=None,
            train_split="training",
            val_split="validation",
            # Layout for name="folder": folders under root ({split} is replaced), suffixes, an optional stem list.
            folder=dict(
                images="images/{split}",
                masks="annotations/{split}",
                image_suffix=".jpg",
                mask_suffix=".png",
                split_file=None,
                reduce_zero_label=False,
            ),
            classes=None,  # class names, where the dataset does not carry them
            image_size=512,  # the training crop (and the size tools.eval times)
            scale=[2048, 512],  # random resize target (long, short side), times a ratio in ratio_range; None: as is
            ratio_range=[0.5, 2.0],
            cat_max_ratio=0.75,  # re-draw a crop that one class fills beyond this
            hflip=True,
            photometric=True,
            test_scale=[2048, 512],  # validation images resized to fit (keeping the ratio); None: as they are
            value_range=[-1.0, 1.0],  # big_vision's convention (and its released weights)
            train_examples=None,
            val_examples=None,
            num_workers=4,
            # Scene settings (tasks.common.scenes: num_train, num_val, seed and SceneSpec fields): write generated
            # scenes at root when root is missing. None: the data must exist.
            generate=None,
        ),
        **engine_config(),
    )
    config.optim.update(
        lr=0.001,
        clip_norm=None,
        schedule="poly",  # (1 - progress) ** 0.9
        end_factor=0.01,  # Segmenter's min_lr 1e-5 at lr 1e-3
    )
    # The consistency term is a soft cross-entropy per labelled pixel here.
    config.train.update(steps=160_000, batch_size=8, ckpt_every=5000)
    config.eval.batch_size = 8
    return config


def apply_common_args(config: Config, args: dict, kind: str) -> Config:
    """The arguments every segmentation config takes: ``fixed=P`` (one patch size) and ``runlocal`` (``kind`` is the
    layout its generated scenes are written in)."""
    if "fixed" in args:
        config.patch_sizes = dict(kind="fixed", sizes=[int(args["fixed"])])
    if args.get("runlocal"):
        make_runlocal(config, kind)
    return config


def runlocal_root(kind: str) -> str:
    """A cached folder of a few generated scenes for CPU smoke runs (written on first use)."""
    return str(Path(tempfile.gettempdir()) / "flexivit-scenes" / f"runlocal-{kind}-v1")


def make_runlocal(config: Config, kind: str = "ade20k") -> Config:
    """Shrink ``config`` to seconds on a CPU: a tiny model from scratch on 16 generated 48 px scenes.

    The data keeps the config's dataset reader: ``kind`` picks the layout the scenes are written in.
    """
    config.model.update(
        name="flexivit_mu",
        init=None,
        overrides=dict(depth=1, width=32, num_heads=2, base_patch_size=16, posemb_grid=7, patch_size=16),
        inference=dict(mode="slide", crop=32, stride=24, flip=False, scales=[1.0]),
    )
    config.data.update(
        root=runlocal_root(kind),
        image_size=48,
        scale=None,
        ratio_range=[0.75, 1.25],
        test_scale=None,
        num_workers=0,
        generate=dict(num_train=16, num_val=4, seed=0, size=48),
    )
    config.patch_sizes = (
        dict(kind="uniform", sizes=[16, 12, 8])
        if config.patch_sizes.kind != "fixed"
        else dict(kind="fixed", sizes=[16])
    )
    config.optim.update(lr=0.01, warmup_steps=1)
    config.train.update(steps=4, batch_size=4, log_every=1, ckpt_every=2)
    config.eval.update(patch_sizes=[16, 10, 8], batch_size=4, every=0)
    return config
