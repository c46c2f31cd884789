"""Image-text data: images with one or more captions each, from CSV / JSON lines, Karpathy-split JSON (Flickr30k,
COCO) or WebDataset-style tar shards.

An :class:`ImageTextSet` holds images (anything indexable that returns a PIL image) and a list of captions per image.
Training flattens it into one item per (image, caption) pair (:class:`CaptionPairs`); evaluation keeps the captions
grouped, so that retrieval can count a query as a hit when any of its captions (or images) is found.

Captions travel through the training loader as UTF-8 bytes in a fixed-length ``uint8`` tensor (:func:`encode_caption`):
the engine's default collate stacks them, and the dataset stays independent of the text tower, which owns its
tokenizer and tokenizes inside the training step.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.common.images import open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ captions as tensors


def encode_caption(text: str, length: int) -> torch.Tensor:
    """``text`` as UTF-8 bytes cut to at most ``length`` (never inside a character), zero-padded: (length,) uint8."""
    raw = text.encode("utf-8")[:length].decode("utf-8", errors="ignore").encode("utf-8")
    out = torch.zeros(length, dtype=torch.uint8)
    out[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def decode_captions(encoded: torch.Tensor) -> list[str]:
    """Inverse of :func:`encode_caption` for a batch (B, length) -> B strings."""
    rows = encoded.to("cpu", torch.uint8).numpy()
    return [bytes(row).split(b"\0", 1)[0].decode("utf-8", errors="ignore") for row in rows]


# ------------------------------------------------------------------------------------------------ datasets


class ImageFiles:
    """Images read from files on demand: ``files[i]`` is a PIL RGB image."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return open_image(self.paths[index])


class DatasetImages:
    """The images of a classification dataset (items ``(image, label)``), labels dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0]


class ImageTextSet(Dataset):
    """Images and their captions; item ``i`` is ``(image i after transform, index i)``.

    Args:
        images: indexable, ``images[i]`` a PIL image.
        captions: one non-empty list of captions per image.
        transform: applied to each image (evaluation); training applies its own (see :class:`CaptionPairs`).
    """

    def __init__(self, images, captions: Sequence[Sequence[str]], transform: Callable | None = None):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        empty = [i for i, caps in enumerate(captions) if not caps]
        if empty:
            raise ValueError(f"images without captions at indices {empty[:10]}")
        self.images, self.captions, self.transform = images, [list(c) for c in captions], transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), index

    def with_transform(self, transform: Callable | None) -> ImageTextSet:
        return ImageTextSet(self.images, self.captions, transform)

    def subset(self, indices: Sequence[int]) -> ImageTextSet:
        """The images ``indices`` (in that order) with their captions."""
        indices = [int(i) for i in indices]
        return ImageTextSet(_Subset(self.images, indices), [self.captions[i] for i in indices], self.transform)


class _Subset:
    def __init__(self, images, indices: list[int]):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.images[self.indices[index]]


class CaptionPairs(Dataset):
    """One training item per (image, caption) pair: ``(PIL image, encoded caption (caption_bytes,) uint8)``.

    Several captions per image become several items, as in LiT / CLIP training on COCO or Flickr30k.
    """

    def __init__(self, data: ImageTextSet, caption_bytes: int):
        self.data, self.caption_bytes = data, caption_bytes
        self.pairs = [(i, j) for i, caps in enumerate(data.captions) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        i, j = self.pairs[index]
        return self.data.images[i], encode_caption(self.data.captions[i][j], self.caption_bytes)


# ------------------------------------------------------------------------------------------------ readers


def _group(rows: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """(image, caption) rows -> images in first-seen order and their captions (several rows per image allowed)."""
    captions: dict[str, list[str]] = {}
    for image, caption in rows:
        captions.setdefault(image, []).append(caption)
    return list(captions), list(captions.values())


def read_pairs_file(
    path: str, image_root: str | None = None, image_key: str = "image", caption_key: str = "caption"
) -> ImageTextSet:
    """Image-caption pairs from JSON lines (``.jsonl``: one object per line) or else CSV (a header row naming the
    columns), one pair per row; rows with the same image are grouped. Image paths are relative to ``image_root``
    (default: the file's folder).
    """
    root = Path(image_root) if image_root else Path(path).parent
    with open(path, encoding="utf-8", newline="") as f:
        if str(path).endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = list(csv.DictReader(f))
    missing = [k for k in (image_key, caption_key) if records and k not in records[0]]
    if missing:
        raise KeyError(f"{path}: no column {missing}; columns are {sorted(records[0])}")
    images, captions = _group([(str(root / r[image_key]), str(r[caption_key])) for r in records])
    return ImageTextSet(ImageFiles(images), captions)


def read_karpathy(path: str, image_root: str, split: str | Sequence[str]) -> ImageTextSet:
    """Flickr30k / COCO captions in Karpathy's split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``).

    ``split`` is one of "train", "val", "test", "restval" or a list of them (COCO's usual training set is
    ["train", "restval"]); image paths are ``image_root/[filepath/]filename``; every image keeps all its sentences.
    """
    splits = {split} if isinstance(split, str) else set(split)
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["images"]
    chosen = [e for e in entries if e["split"] in splits]
    if not chosen:
        found = sorted({e["split"] for e in entries})
        raise ValueError(f"{path}: no images in split {sorted(splits)}; splits present: {found}")
    paths = [os.path.join(image_root, e.get("filepath", ""), e["filename"]) for e in chosen]
    captions = [[s["raw"].strip() for s in e["sentences"]] for e in chosen]
    return ImageTextSet(ImageFiles(paths), captions)


class TarImages:
    """Images stored in uncompressed tar shards, read by offset (no extraction, safe with DataLoader workers)."""

    def __init__(self, members: Sequence[tuple[str, int, int]]):
        self.members = list(members)  # (shard path, data offset, size)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> Image.Image:
        shard, offset, size = self.members[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        return open_image(raw, f"image {index} of {shard} (offset {offset})")


def read_tar_shards(pattern: str | Sequence[str]) -> ImageTextSet:
    """WebDataset-layout shards (``key.jpg`` + ``key.txt`` or ``key.json`` with a "caption" field), map-style.

    Uses only the standard library's ``tarfile`` to index the shards, so it needs no ``webdataset`` package and fits
    the engine's indexed, resumable loader. A ``.json`` may hold one "caption" or a list under "captions".
    """
    paths = sorted(glob.glob(pattern)) if isinstance(pattern, str) else list(pattern)
    if not paths:
        raise FileNotFoundError(f"no tar shards match {pattern}")
    members, captions = [], []
    for shard in paths:
        images: dict[str, tuple[int, int]] = {}
        texts: dict[str, list[str]] = {}
        with tarfile.open(shard, "r:") as tar:  # "r:" refuses compressed tars, which cannot be read by offset
            for info in tar:
                if not info.isfile():
                    continue
                folder, name = os.path.split(info.name)
                key, _, suffix = name.partition(".")
                key, suffix = os.path.join(folder, key), "." + suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    images[key] = (info.offset_data, info.size)
                elif suffix in (".txt", ".json"):
                    raw = tar.extractfile(info).read().decode("utf-8")
                    if suffix == ".txt":
                        texts[key] = [raw.strip()]
                    else:
                        record = json.loads(raw)
                        texts[key] = list(record["captions"]) if "captions" in record else [record["caption"]]
        for key in sorted(images.keys() & texts.keys()):
            members.append((shard, *images[key]))
            captions.append(texts[key])
    if not members:
        raise ValueError(f"no image with a caption in the shards {paths[:3]}...")
    return ImageTextSet(TarImages(members), captions)
