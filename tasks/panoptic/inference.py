"""Stage II on a user's images: predicted panoptic maps as a colour PNG, COCO-panoptic-like segments and a summary.

    predict(model, config, info, images, patch_size, options) -> [Prediction]   (the task contract's predict)

Each image is preprocessed as evaluation does (resized to the model's square size, the config's value range),
stage II decodes its codes at ``patch_size``, the frozen oracle's decoder turns them into ``(semantic, instance)``
maps, and the maps are resized back to the image by nearest neighbour, as PQ evaluation resizes them. A segment is
one (class, instance) pair, as in the COCO panoptic files evaluation writes (``segments_from_prediction``).
"""

from __future__ import annotations

import colorsys
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

from tasks import Prediction
from tasks.common.transforms import as_value_range

from .data import eval_image, resize_maps
from .targets import segments_from_prediction

VOID_COLOUR = (0, 0, 0)  # pixels in no segment; no segment gets it


@torch.no_grad()
def predict(model, config, info, images, patch_size, options) -> list[Prediction]:
    """The panoptic segmentation of each PIL image at ``patch_size``: a colour map at the image's size (one colour
    per segment, things of a class in shades of its colour), ``{"segments_info": [...]}`` and a one-line summary.
    No options: decoding is greedy, as in evaluation."""
    categories = info.get("categories")
    if not categories:
        raise ValueError("this run's info has no categories (a checkpoint from before they were saved): retrain it")
    device = next(model.parameters()).device
    size, value_range = model.oracle.kwargs["image_size"], as_value_range(config.data.value_range)
    x = torch.stack([eval_image(image.convert("RGB"), size, value_range) for image in images]).to(device)
    semantic, instance = model.predict(x, patch_size)
    return [
        panoptic_prediction(*resize_maps(s, i, (image.height, image.width)), categories)
        for s, i, image in zip(semantic, instance, images, strict=True)
    ]


def panoptic_prediction(semantic: torch.Tensor, instance: torch.Tensor, categories: list[dict]) -> Prediction:
    """One image's ``(semantic, instance)`` maps (H, W) -> its :class:`Prediction` (class k is ``categories[k-1]``)."""
    ids, segments = segments_from_prediction(semantic.numpy(), instance.numpy())  # ids 1..N, 0 = void
    base = class_colours(categories)
    colours = segment_colours([s["class"] for s in segments], base)
    record = {
        "segments_info": [
            {
                "id": s["id"],
                "category_id": categories[s["class"] - 1]["id"],
                "category": categories[s["class"] - 1]["name"],
                "isthing": bool(categories[s["class"] - 1]["isthing"]),
                "area": s["area"],
                "color": list(colours[s["id"]]),  # its pixels' colour in the image
            }
            for s in segments
        ]
    }
    present = sorted({s["class"] for s in segments})
    return Prediction(
        summary=summary(Counter(s["category"] for s in record["segments_info"])),
        record=record,
        image=Image.fromarray(np.asarray(colours, np.uint8)[ids]),
        overlay=True,
        legend=legend([(categories[k - 1], base[k - 1]) for k in present]) if present else None,
    )


def summary(counts: Counter) -> str:
    """``"5 segments: 2 shirt, bag, grass, sky"`` (categories by how many segments they have, then by name)."""
    total = sum(counts.values())
    if not total:
        return "0 segments (every pixel void)"
    parts = [f"{n} {name}" if n > 1 else name for name, n in sorted(counts.items(), key=lambda c: (-c[1], c[0]))]
    return f"{total} segment{'s' if total > 1 else ''}: {', '.join(parts)}"


def class_colours(categories: list[dict]) -> list[tuple[int, int, int]]:
    """Each category's colour: the dataset's when it gives one, else a fixed hue walk (the same on every run)."""
    colours = []
    for k, category in enumerate(categories):
        if category.get("color") is not None:
            colours.append(tuple(int(v) for v in category["color"]))
        else:
            rgb = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95 if k % 2 else 0.8)
            colours.append(tuple(round(255 * v) for v in rgb))
    return colours


def segment_colours(classes: list[int], colours: list[tuple]) -> list[tuple[int, int, int]]:
    """Row 0 void, row n the colour of segment n (``classes[n - 1]`` its class): the class's colour for its first
    segment, then lighter and darker shades of it; all distinct, so a colour names one segment in the image."""
    out, used, seen = [VOID_COLOUR], {VOID_COLOUR}, Counter()
    for label in classes:
        colour = _shade(colours[label - 1], seen[label])
        seen[label] += 1
        code = (colour[0] << 16) | (colour[1] << 8) | colour[2]
        while colour in used:  # two classes of one colour, or a shade that met another: step through all 2^24
            code = (code + 0x9E3779) % (1 << 24)  # odd: the walk visits every colour before it repeats
            colour = (code >> 16, (code >> 8) & 255, code & 255)
        used.add(colour)
        out.append(colour)
    return out


def _shade(colour: tuple, k: int) -> tuple[int, int, int]:
    """The k-th shade of a colour: itself, then alternately lighter and darker by 15 % more each pair."""
    if k == 0:
        return colour
    t = min(0.15 * ((k + 1) // 2), 0.75)
    target = 255 if k % 2 else 0
    return tuple(round(v + t * (target - v)) for v in colour)


def legend(entries: list[tuple[dict, tuple]]) -> Image.Image:
    """A swatch of each ``(category, colour)`` with its name and whether it is a thing or stuff."""
    labels = [f"{c['name']} ({'thing' if c['isthing'] else 'stuff'})" for c, _ in entries]
    row = 18
    image = Image.new("RGB", (28 + 7 * max(map(len, labels)), row * len(entries) + 6), "white")
    draw = ImageDraw.Draw(image)
    for n, ((_, colour), label) in enumerate(zip(entries, labels, strict=True)):
        y = 3 + n * row
        draw.rectangle([4, y + 2, 16, y + 14], fill=tuple(colour), outline="black")
        draw.text((22, y + 3), label, fill="black")
    return image
