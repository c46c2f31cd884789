"""The full set of detection config keys with their defaults (OWL-ViT's LVIS recipe); dataset configs change the rest.

Every key a config may set exists here, so ``--set`` can reject typos (tasks/common/config.py). The recipe is
scenic's OWL-ViT (docs/reference.md §8): Adam-style optimiser, 5e-5 for the image tower and heads, 2e-6 for the
text tower (``optim.lr_mults``), warm-up + cosine, flip + random crop + resize-with-pad + mosaics, federated LVIS
query sets.
"""

from configs.common import engine_config, parse_arg  # noqa: F401  (parse_arg re-exported for the dataset configs)
from tasks.common.config import Config


def base_config() -> Config:
    config = Config(
        task="detection",
        model=dict(
            # The image tower: a registered FlexiViT (its head dropped), and the text tower (tasks.contrastive's
            # kinds). Both are built from these keys; ``init`` then fills them: a contrastive workdir / checkpoint
            # (both towers and the text projection, whose architecture must match these keys), or a FlexiViT file
            # (.npz / timm / ours: the image tower only, with the checkpoint rules of flexivit.create_model).
            name="flexivit_base",
            overrides={},
            text=dict(kind="openclip", width=512, layers=12, heads=8, context_length=77),
            embed_dim=None,  # the shared embedding size; None = the image tower's width
            text_proj=True,
            init=None,
            text_init=None,  # a contrastive workdir / checkpoint for the text tower alone (when init is a FlexiViT)
            objectness=False,  # OWLv2's objectness head (on detached features)
        ),
        data=dict(
            format="lvis",  # lvis | coco: the annotation format, and the evaluator (LVISEval / COCOeval)
            train_json=None,
            val_json=None,
            train_images=None,  # the folders the JSONs' file names are relative to
            val_images=None,
            classnames=None,  # names used in the prompts, one per category in id order; None: the JSON's names
            rare_classes=None,  # names removed from training and marked rare ('r') for evaluation; None: the JSON's
            drop_rare_images=False,  # also drop training images that show a rare class (strict zero-shot split)
            image_size=768,  # the padded square side S
            num_queries=50,  # query slots per training image (positives + verified + random negatives, padded)
            merge_iou=0.9,  # LVIS: boxes of one image overlapping this much are one multi-label instance
            hflip=True,
            crop_area=[0.3, 1.0],  # random crop area fraction (docs/reference.md §8); [1, 1] turns the crop off
            crop_aspect=[0.75, 1.333],
            min_box_fraction=0.6,  # a box keeping less of its area inside the crop is dropped
            pad_value=0.5,  # training pad (evaluation pads with 0, as scenic)
            mosaic_probs=[0.4, 0.3, 0.3],  # 1x1 / 2x2 / 3x3; None: no mosaics
            value_range=[-1.0, 1.0],
            train_templates="clip",  # "clip" ('{}' + the 80 CLIP templates) or a list of format strings
            eval_templates="lvis",  # "lvis" (the 7 of OWL-ViT's LVIS evaluation) or a list
            train_examples=None,
            val_examples=None,
            num_workers=4,
            # Scene settings (tasks.common.scenes: num_train, num_val, seed and SceneSpec fields): write generated
            # scenes at root when root is missing. None: the data must exist.
            root=None,
            generate=None,
        ),
        **engine_config(),
    )
    config.optim.update(
        name="adamw",
        lr=5e-5,
        weight_decay=0.0,
        warmup_steps=1000,
        clip_norm=1.0,
        lr_mults={r"^text\.|^text_proj\.": 2e-6 / 5e-5},
    )
    config.train.update(steps=140_000, batch_size=256, ckpt_every=5000)
    config.eval.update(batch_size=8, max_dets=300)
    return config
