"""Predict on your own images at one patch size (or the one ``tools.deploy`` chose for a latency budget).

    python -m tools.predict --workdir runs/fashion_mnist --patch-size 8 shoe.png photos/
    python -m tools.predict --workdir runs/fashion_mnist --budget-ms 20 photos/
    python -m tools.predict --workdir runs/seg --patch-size 8 scenes/ --out masks/
    python -m tools.predict --workdir runs/lit --patch-size 8 photos/ --queries "a photo of a shoe" "a photo of a bag"

Classification prints the top-k classes with their probabilities; segmentation writes a colour PNG mask per image
(same size as the image) and ``legend.png`` with the classes' colours; the contrastive model prints the queries
that match each image best (cosine similarity; default queries: its zero-shot class prompts). Folders are read in
sorted order (their image files); an image that cannot be read (not an image, truncated, or a decompression bomb)
is named and skipped, and counted at the end. Exit status 1 when no input could be predicted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.common.deployment import PRECISIONS, BudgetError, autocast, autocast_dtype, choose
from tasks.common.images import ImageError, open_image
from tools.arguments import positive_float, positive_int
from tools.eval import check_patch_sizes, load_task_model, task_token_grid, workdir_source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and folders of images")
    parser.add_argument("--workdir", required=True, help="a classification, segmentation or contrastive workdir")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--patch-size", type=positive_int)
    size.add_argument(
        "--budget-ms", type=positive_float, help="the patch size tools.deploy measured as best within this"
    )
    parser.add_argument("--topk", type=positive_int, default=3)
    parser.add_argument("--queries", nargs="+", help="contrastive: the texts to match (default: class prompts)")
    parser.add_argument("--out", help="segmentation: the folder for the masks (default: <workdir>/predictions)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--batch", type=positive_int, default=16)
    return parser.parse_args(argv)


def list_images(inputs) -> list[Path]:
    """Files as given; folders expanded to their image files in sorted order. A missing path, or no file at all, is
    an error."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"{path}: no such file or folder")
    if not files:
        raise SystemExit(f"no image files in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def budget_patch_size(workdir: Path, budget_ms: float) -> int:
    """The best patch size within ``budget_ms`` by the latencies ``tools.deploy`` measured (``deploy/choice.json``)."""
    path = Path(workdir) / "deploy" / "choice.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m tools.deploy --workdir {workdir} --budget-ms ...` first")
    try:
        choice = json.loads(path.read_bytes())
        rows, metric = choice["rows"], choice["metric"]
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not what tools.deploy writes
        raise SystemExit(f"{path} is damaged ({error!r}): run tools.deploy again") from None
    try:
        row = choose(rows, metric, budget_ms=budget_ms)
    except BudgetError as error:
        raise SystemExit(f"{path}: {error}") from None
    device, batch = row["device"], row["batch"]
    print(f"patch {row['patch_size']}: {choice['metric']} {row[choice['metric']]:.4g}, "
          f"{row['latency_ms']:.3g} ms per batch of {batch} on {device} (tools.deploy)")  # fmt: skip
    return int(row["patch_size"])


class Predictor:
    """The task's preprocessing, forward at one patch size and output for one batch of images."""

    def __init__(self, task_name: str, model, config, info, patch: int, device, dtype, args):
        self.task_name, self.model, self.patch, self.device, self.dtype = task_name, model, patch, device, dtype
        self.args, data = args, config.data
        if task_name not in ("classification", "segmentation", "contrastive"):
            raise SystemExit(f"tools.predict handles classification, segmentation and contrastive; not {task_name}")
        if task_name == "segmentation":
            from tasks.segmentation.transforms import EvalTransform

            scale = tuple(data.test_scale) if data.test_scale else None
            self.transform = lambda image: EvalTransform(scale=scale, value_range=data.value_range)(
                image, np.zeros((1, 1), np.uint8)
            )[0]
            self.palette = palette(len(info))
            self.out = Path(args.out) if args.out else Path(args.workdir) / "predictions"
        else:
            from tasks.common.transforms import data_eval_transform

            self.transform = data_eval_transform(data)
        if task_name == "contrastive":
            queries = args.queries or _class_prompts(config, info)
            if not queries:
                raise SystemExit("the contrastive model needs --queries (its config has no zero-shot class names)")
            self.queries = list(queries)
            with torch.no_grad():
                tokens = model.tokenize(self.queries).to(device)
                self.text = model.encode_text(tokens, normalize=True).float()
        else:
            self.classes = list(info)

    def __call__(self, paths: list[Path], images: list[Image.Image]) -> list[str]:
        with torch.no_grad(), autocast(self.device, self.dtype):
            if self.task_name == "segmentation":
                return [self._segment(path, image) for path, image in zip(paths, images, strict=True)]
            x = torch.stack([self.transform(image) for image in images]).to(self.device)
            if self.task_name == "classification":
                probs = self.model(x, patch_size=self.patch).float().softmax(-1)
                return [self._top(p, self.classes) for p in probs]
            features = self.model.encode_image(x, self.patch, normalize=True).float()
            return [self._top(f @ self.text.T, self.queries, "cos") for f in features]

    def _top(self, scores: torch.Tensor, names, kind: str = "p") -> str:
        values, index = scores.topk(min(self.args.topk, len(names)))
        return ", ".join(f"{names[i]} ({kind} {v:.3f})" for v, i in zip(values.tolist(), index.tolist(), strict=True))

    def _segment(self, path: Path, image: Image.Image) -> str:
        from tasks.segmentation.inference import predict

        x = self.transform(image)[None].to(self.device)
        scores = predict(self.model, x, self.patch, self.model.inference, out_size=(image.height, image.width))
        labels = scores.argmax(1)[0].cpu().numpy()
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.out / f"{path.stem}_mask.png"
        Image.fromarray(self.palette[labels]).save(target)
        present, counts = np.unique(labels, return_counts=True)
        share = ", ".join(f"{self.classes[c]} {n / labels.size:.0%}" for c, n in zip(present, counts, strict=True))
        return f"{target} ({share})"


def _class_prompts(config, info) -> list[str]:
    names = list((info or {}).get("classnames", []))
    templates = list((config.data.zeroshot or {}).get("templates") or ["{}"])
    return [templates[0].format(name) for name in names]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, distinct and the same on every run (a fixed hue walk)."""
    import colorsys

    colours = [
        colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 if i % 2 else 0.9, 0.95 if i % 3 else 0.75) for i in range(n)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8)


def write_legend(classes, colours: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig = plt.figure(figsize=(3.2, 0.3 * len(classes) + 0.4))
    handles = [Patch(color=colours[i] / 255, label=f"{i}: {name}") for i, name in enumerate(classes)]
    fig.legend(handles=handles, loc="center", frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    files = list_images(args.inputs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = autocast_dtype(args.precision, device)
    config, checkpoint = workdir_source(args.workdir, args.config, args.set)
    task = importlib.import_module(f"tasks.{config.task}")
    patch = args.patch_size if args.patch_size is not None else budget_patch_size(Path(args.workdir), args.budget_ms)
    check_patch_sizes([patch], config.data.image_size, "--patch-size", task_token_grid(task))
    _, _, _, info = task.build_datasets(config.data)
    model = load_task_model(task, config, info, checkpoint).to(device).eval()
    predictor = Predictor(config.task, model, config, info, patch, device, dtype, args)

    results, skipped = {}, []
    bar = tqdm(total=len(files), desc=f"predicting at patch {patch}", unit="img", disable=len(files) < 2)
    for start in range(0, len(files), args.batch):
        paths, images = [], []
        for path in files[start : start + args.batch]:
            try:
                images.append(open_image(path))
                paths.append(path)
            except ImageError as error:
                skipped.append(str(path))
                tqdm.write(f"skipped: {error}")
        for path, line in zip(paths, predictor(paths, images) if paths else [], strict=True):
            results[str(path)] = line
            tqdm.write(f"{path}: {line}")
        bar.update(len(files[start : start + args.batch]))
    bar.close()
    if not results:  # a run that predicted nothing must not look like success
        raise SystemExit(f"none of the {len(files)} input image(s) could be read: nothing was predicted")
    if config.task == "segmentation":
        legend = write_legend(predictor.classes, predictor.palette, predictor.out / "legend.png")
        print(f"masks in {predictor.out}, colours in {legend}")
    print(f"{len(results)} image(s) predicted at patch {patch}" + (f", {len(skipped)} skipped" if skipped else ""))
    if skipped:
        print("skipped: " + ", ".join(skipped), file=sys.stderr)
    return {"patch_size": patch, "results": results, "skipped": skipped}


if __name__ == "__main__":
    main()
