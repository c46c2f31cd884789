"""Investigation: does the main job's classifier recognise the items of the generated scenes? Top-1 on square crops
around their ground-truth boxes.

    python -m tools.scripts.crop_accuracy --checkpoint runs/fashion_mnist --scenes data/scenes data/scenes_plain

The question it answered: open-vocabulary detection (OWL-ViT) transfers what the image tower already knows, so
which scene style lets a Fashion-MNIST backbone's knowledge carry over? Each ground-truth thing box of the
validation split (LVIS JSON) is cut out as the square around its centre with the box's longer side, resized to the
classifier's training size and classified at one patch size. Answer, documented in docs/detection.md ("Why these
scenes"): 33 % on the segmentation demo's tinted, textured scenes, 66 % on untinted items on black, so the
detection demo uses the plain scenes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks import get_task
from tasks.common.train_state import resolve_checkpoint


def crop_accuracy(model, scenes: Path, size: int = 48, patch_size: int = 8, num_classes: int = 10) -> tuple[int, int]:
    """(correct, total) over the thing boxes (category ids 1..num_classes, label = id - 1) of ``scenes``' val split."""
    gt = json.loads((scenes / "lvis" / "lvis_val.json").read_text())
    files = {image["id"]: image["file_name"] for image in gt["images"]}
    correct = total = 0
    for ann in gt["annotations"]:
        if not 1 <= ann["category_id"] <= num_classes:
            continue  # stuff
        with Image.open(scenes / "images" / "validation" / files[ann["image_id"]]) as image:
            x, y, w, h = ann["bbox"]
            side, cx, cy = max(w, h), x + w / 2, y + h / 2
            crop = image.convert("RGB").crop((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        pixels = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)
        inputs = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1  # [-1, 1], as the main job trains
        with torch.no_grad():
            correct += int(model(inputs, patch_size=patch_size).argmax()) == ann["category_id"] - 1
        total += 1
    return correct, total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/fashion_mnist", help="a classification checkpoint or workdir")
    parser.add_argument("--scenes", nargs="+", type=Path, required=True, help="scene folders (tools.make_scenes)")
    parser.add_argument("--size", type=int, default=48, help="the classifier's image size")
    parser.add_argument("--patch-size", type=int, default=8)
    args = parser.parse_args(argv)
    # The classification task's own loader: the model from the checkpoint alone (tasks/__init__.py).
    model = get_task("classification").load_model(resolve_checkpoint(args.checkpoint)).eval()
    print("| scenes | crops | top-1 (%) |\n|---|---:|---:|")
    for scenes in args.scenes:
        correct, total = crop_accuracy(model, scenes, args.size, args.patch_size)
        print(f"| {scenes} | {total} | {100 * correct / max(total, 1):.1f} |")


if __name__ == "__main__":
    main()
