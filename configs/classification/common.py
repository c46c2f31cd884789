"""The full set of classification config keys with their defaults; dataset configs change what they need.

Every key a config may set exists here, so ``--set`` can reject typos (tasks/common/config.py).
"""

from configs.common import engine_config, parse_arg  # noqa: F401  (parse_arg re-exported for the configs)
from tasks.common.config import Config
from tasks.common.optim import big_vision_weight_decay


def base_config() -> Config:
    config = Config(
        task="classification",
        model=dict(
            name="flexivit_small",
            init=None,  # .npz / timm / our checkpoint / workdir, or an official release name
            overrides={},  # FlexiViT keyword arguments, e.g. {"depth": 6}
            new_head=False,  # replace the loaded head by a fresh zero-initialised one (transfer to new classes)
        ),
        data=dict(
            name="fashion_mnist",
            root=None,
            train_split="train",  # a split, or a contiguous slice of one: "train[:50%]", "train[1000:]"
            val_split="test",
            image_size=240,
            value_range=[-1.0, 1.0],  # big_vision's convention (and its released weights)
            crop_scale=[0.08, 1.0],
            hflip=True,
            randaugment=False,
            eval_crop_ratio=0.875,
            classes=None,  # keep only these classes (relabelled 0..k-1)
            train_examples=None,
            val_examples=None,
            num_workers=0,
        ),
        **engine_config(),
    )
    config.train.update(
        label_smoothing=0.0,
        mixup=0.0,  # Beta(alpha, alpha) mixing ratio per batch; 0 = off
    )
    return config


def distill_config(
    name=None, init=None, overrides=None, patch_size=None, image_size=None, value_range=None, init_student=True
) -> Config:
    """The ``distill`` block (paper Sec. 3.5).

    The teacher is a registered model ``name`` (with ``overrides``) loaded from ``init`` (a file, a workdir or a
    release name), or, with ``name=None``, a checkpoint of this project at ``init``. It runs at ``patch_size`` on its
    own view of each training item: the student's crop and flip, resized from the source image to ``image_size``
    (FunMatch's consistent views; None: the student's images), mixed like the student's. ``value_range`` is the
    input range the teacher was trained with (e.g. "imagenet" for timm's DeiT-III; None: the student's
    ``data.value_range``). ``init_student`` starts the student at the teacher's weights, PI-resized to the student's
    underlying sizes.
    """
    return Config(
        name=name,
        init=init,
        overrides=overrides or {},
        patch_size=patch_size,
        image_size=image_size,
        value_range=value_range,
        init_student=init_student,
    )


def big_vision_distill_config(
    model: str, *, train_images: int, batch: int, epochs: int, num_workers: int, teacher: Config
) -> Config:
    """big_vision's FlexiViT distillation recipe (configs/proj/flexivit/*_distill.py) on an image folder at 240 px.

    Adam lr 1e-4, 5k warmup steps, cosine decay, gradient clip 1.0, mixup on every batch, bf16. Weight decay: the
    recipes' wd 1e-5 (big_vision/configs/proj/flexivit/{i1k_deit3,i21k}_distill.py: lr 1e-4, wd 1e-5) is decoupled
    from the learning rate there; torch's AdamW multiplies it by the learning rate, hence 1e-5 / 1e-4 = 0.1 here
    (:func:`tasks.common.optim.big_vision_weight_decay`).
    """
    config = base_config()
    config.model.name = model  # no init: the student starts at the teacher (distill.init_student)
    config.data.update(
        name="imagefolder", train_split="train", val_split="val", image_size=240, num_workers=num_workers
    )
    config.train.update(
        steps=epochs * train_images // batch,
        batch_size=batch,
        mixup=1.0,
        precision="bf16",
        log_every=50,
        ckpt_every=1000,
    )
    lr = 1e-4
    config.optim.update(
        name="adamw",
        lr=lr,
        weight_decay=big_vision_weight_decay(1e-5, lr),  # = 0.1
        warmup_steps=5000,
        schedule="cosine",
        clip_norm=1.0,
    )
    config.distill = teacher
    config.eval.update(every=5000, batch_size=256)
    return config
