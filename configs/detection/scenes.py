"""The embedded default: open-vocabulary detection of Fashion-MNIST items in generated scenes (OWL-ViT on FlexiLiT).

    bash tools/detection_demo.sh      # everything below, and the patch-size sweep (docs/detection.md)
    python -m tools.train --config configs/detection/scenes.py --workdir runs/det_scenes_flexi
    python -m tools.train --config configs/detection/scenes.py:fixed=16 --workdir runs/det_scenes_p16
    python -m tools.eval --workdir runs/det_scenes_flexi runs/det_scenes_p16 --names flexified fixed-p16

Arguments (comma-separated, after a colon):
    fixed=P          train at patch size P only (P=16, the largest, is the cheap "fast transfer")
    shuffled_rare    evaluate with the rare classes' names permuted among themselves: the baseline that shows the
                     zero-shot APr comes from the text queries (it must fall to chance)
    textured         the segmentation demo's scenes (tinted items, textured backgrounds, overlaps) instead
    strict           also drop every training image that shows a rare class (data.drop_rare_images)
    runlocal         a tiny model on a few 48 px scenes, seconds on a CPU (smoke tests; no runs/ needed)

Towers: the FlexiLiT of the contrastive demo (``runs/flexilit``: the main job's FlexiViT-mu locked, and a small
open_clip text tower trained on captions naming all ten classes). Detection trains the image tower and the heads;
the text tower stays frozen, so the names of classes never seen in detection training keep the embeddings the
image-text stage gave them (OWL-ViT trains it at a 25x smaller learning rate; frozen is the limit of that).

Data: 96 px scenes of tasks/common/scenes.py (2-5 items of 29-58 px, LVIS-format JSON, ``data/scenes_plain``,
written if missing) with the items as Fashion-MNIST shows them: untinted, on black, not overlapping. Three classes
are "rare": removed from the detection training annotations and marked 'r' in the evaluation JSON, so APr is
zero-shot. Evaluation on the 200 held-out scenes with LVISEval.
"""

from configs.contrastive.fashion_mnist import TEXT_TOWERS
from configs.detection.common import base_config, parse_arg
from configs.segmentation.common import runlocal_root
from tasks.contrastive.fashion_captions import EVAL_TEMPLATES, TRAIN_TEMPLATES

PATCH_SIZES = [16, 12, 8, 6, 4]
RARE = ["Trouser", "Bag", "Sneaker"]
# The names the text tower learnt (the captions' nouns: the lower-cased Fashion-MNIST class names).
CLASSNAMES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def get_config(arg=None):
    args = parse_arg(arg, allowed=("fixed", "shuffled_rare", "textured", "strict", "runlocal"))
    config = base_config()
    config.model.update(
        name="flexivit_mu",
        overrides=dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=16),
        text=dict(TEXT_TOWERS["openclip"]),
        init="runs/flexilit",
    )
    classnames = list(CLASSNAMES)
    if args.get("shuffled_rare"):
        # A cyclic shift among the rare classes: every rare class is queried with another rare class's name.
        index = [CLASSNAMES.index(n.lower()) for n in RARE]
        for src, dst in zip(index, index[1:] + index[:1], strict=True):
            classnames[src] = CLASSNAMES[dst]
    # Items as Fashion-MNIST shows them (untinted, on black, unoccluded): there the image tower recognises a box crop
    # 70 % of the time, against 33 % on the segmentation demo's tinted, textured, overlapping scenes (``textured``),
    # and the image-text alignment it carries is what zero-shot detection of the rare classes stands on.
    textured = bool(args.get("textured"))
    root = "data/scenes" if textured else "data/scenes_plain"
    look = (
        {}
        if textured
        else dict(background_value=[0.0, 0.0], item_saturation=[0.0, 0.0], floor_prob=0.0, max_occlusion=0.0)
    )
    config.data.update(
        format="lvis",
        root=root,
        train_json=f"{root}/lvis/lvis_train.json",
        val_json=f"{root}/lvis/lvis_val.json",
        train_images=f"{root}/images/training",
        val_images=f"{root}/images/validation",
        classnames=classnames,
        rare_classes=list(RARE),
        image_size=96,
        num_queries=10,
        crop_area=[0.5, 1.0],
        mosaic_probs=None,  # 2x2 mosaics of 96 px scenes would shrink the items below the smallest patch size
        value_range=[-1.0, 1.0],
        train_templates=list(TRAIN_TEMPLATES),
        eval_templates=list(EVAL_TEMPLATES),
        num_workers=0,
        generate=dict(num_train=2000, num_val=200, seed=0, size=96, **look),
    )
    config.patch_sizes = dict(kind="uniform", sizes=PATCH_SIZES)
    config.optim.update(name="adamw", lr=5e-4, warmup_steps=50, weight_decay=1e-4, lr_mults={})
    config.optim.frozen = [r"^text\.", r"^text_proj\."]
    config.train.update(steps=2000, batch_size=16, precision="bf16", log_every=25, ckpt_every=200)
    config.eval.update(patch_sizes=[16, 12, 10, 8, 6, 4], batch_size=50, every=0)

    if args.get("strict"):
        config.data.drop_rare_images = True
    if "fixed" in args:
        config.patch_sizes = dict(kind="fixed", sizes=[int(args["fixed"])])
    if args.get("runlocal"):
        config.model.update(
            init=None, overrides=dict(depth=1, width=32, num_heads=2, base_patch_size=16, patch_size=12)
        )
        config.model.text.update(width=32, layers=1, heads=2, context_length=16)
        root = runlocal_root("ade20k")  # the segmentation smoke runs' scenes (every format is written)
        config.data.update(
            root=root, train_json=f"{root}/lvis/lvis_train.json", val_json=f"{root}/lvis/lvis_val.json",
            train_images=f"{root}/images/training", val_images=f"{root}/images/validation",
            image_size=48, generate=dict(num_train=16, num_val=4, seed=0, size=48),
        )  # fmt: skip
        config.patch_sizes = dict(kind="uniform", sizes=[16, 12, 8]) if "fixed" not in args else config.patch_sizes
        config.train.update(steps=4, batch_size=4, precision="fp32", log_every=1, ckpt_every=2)
        config.eval.update(patch_sizes=[16, 12, 8], batch_size=4)
    return config
