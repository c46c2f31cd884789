"""The embedded image-text data: Fashion-MNIST images with captions built from their class and their tone.

Fashion-MNIST ships offline (Debian ``dataset-fashion-mnist``) but has no captions, so they are made here: a
template ("a photo of a {}.") around a noun for the class (the dataset's class name or a synonym), with or without
the item's tone ("dark" / "light": its mean foreground brightness against the median of its class in the training
split). Training and evaluation use disjoint templates, so zero-shot prompts and retrieval captions are phrasings the
text tower has never seen; the nouns and tones are shared. This is a toy: the captions carry at most 20 meanings
(10 classes x 2 tones), so it tests the machinery and the patch-size behaviour, not language understanding.
"""

from __future__ import annotations

import functools

import numpy as np

from tasks.common.datasets import build_dataset

from .data import DatasetImages, ImageTextSet

# Synonyms per class, the dataset's own (lower-cased) name first: the zero-shot evaluator uses that name.
NOUNS = {
    "T-shirt/top": ["t-shirt/top", "t-shirt", "top", "tee"],
    "Trouser": ["trouser", "pair of trousers", "pair of pants"],
    "Pullover": ["pullover", "sweater", "jumper"],
    "Dress": ["dress", "frock"],
    "Coat": ["coat", "jacket"],
    "Sandal": ["sandal", "summer sandal"],
    "Shirt": ["shirt", "button-down shirt"],
    "Sneaker": ["sneaker", "trainer", "running shoe"],
    "Bag": ["bag", "handbag"],
    "Ankle boot": ["ankle boot", "boot"],
}
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a {} on a black background.",
    "an image of a {}.",
    "a picture of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "this is a {}.",
    "a grayscale photo of a {}.",
    "a {} from an online shop.",
    "{}",
]
# Held out from training: the zero-shot prompts and the retrieval captions.
EVAL_TEMPLATES = [
    "a close-up photo of a {}.",
    "a catalogue image of a {}.",
    "there is a {} in the picture.",
    "a small photo of the {}.",
]
FOREGROUND = 20  # pixel value (of 255) above which a pixel belongs to the item, not the black background


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean brightness of each item's foreground pixels: (N, H, W) uint8 -> (N,)."""
    fg = images > FOREGROUND
    return (images * fg).sum((1, 2)) / np.maximum(fg.sum((1, 2)), 1)


def tone_thresholds(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The median foreground brightness per class: half of each class is "dark", half "light"."""
    values = brightness(images)
    return np.array([np.median(values[labels == c]) for c in range(num_classes)])


@functools.lru_cache(maxsize=4)
def _training_thresholds(root: str | None) -> np.ndarray:
    train = build_dataset("fashion_mnist", "train", root=root)
    return tone_thresholds(train.images, train.targets, len(train.classes))


def fashion_captions(
    split: str,
    *,
    root: str | None = None,
    captions_per_image: int = 2,
    templates: list[str] | None = None,
    seed: int = 0,
) -> ImageTextSet:
    """Fashion-MNIST ``split`` with generated captions.

    "train": ``captions_per_image`` captions per image from :data:`TRAIN_TEMPLATES`, each with a random synonym
    and, with probability 1/2, the tone. Other splits: one caption per template of ``templates`` (default
    :data:`EVAL_TEMPLATES`) with the class name and the tone, the same for every image of that class and tone
    (retrieval treats identical captions as one, relevant to all the images that have it).
    """
    data = build_dataset("fashion_mnist", split, root=root)
    classes, labels = list(data.classes), data.targets
    nouns = [NOUNS.get(name, [name.lower()]) for name in classes]
    tones = np.where(brightness(data.images) > _training_thresholds(root)[labels], "light", "dark")
    if split != "train":
        return ImageTextSet(
            DatasetImages(data),
            [
                [t.format(f"{tone} {nouns[label][0]}") for t in templates or EVAL_TEMPLATES]
                for label, tone in zip(labels, tones, strict=True)
            ],
        )
    rng = np.random.default_rng(seed)
    shape = (len(labels), captions_per_image)
    template = rng.integers(0, len(TRAIN_TEMPLATES), shape).tolist()
    synonym = rng.random(shape).tolist()  # scaled to each class's number of synonyms below
    with_tone = (rng.random(shape) < 0.5).tolist()
    captions = []
    for label, tone, ts, us, ws in zip(labels.tolist(), tones.tolist(), template, synonym, with_tone, strict=True):
        options = nouns[label]
        phrases = [options[int(u * len(options))] for u in us]
        captions.append(
            [TRAIN_TEMPLATES[t].format(f"{tone} {p}" if w else p) for t, p, w in zip(ts, phrases, ws, strict=True)]
        )
    return ImageTextSet(DatasetImages(data), captions)
