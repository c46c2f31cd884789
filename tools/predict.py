"""Predict on your own images at one patch size (or the one ``tools.deploy`` chose for a latency budget), any task.

    python -m tools.predict --workdir runs/fashion_mnist --patch-size 8 shoe.png photos/
    python -m tools.predict --workdir runs/fashion_mnist --budget-ms 20 photos/
    python -m tools.predict --workdir runs/seg --patch-size 8 scenes/ --out masks/
    python -m tools.predict --workdir runs/lit --patch-size 8 photos/ --queries "a photo of a shoe" "a photo of a bag"
    python -m tools.predict --workdir runs/det_scenes_flexi --patch-size 8 scene.png --queries "a bag" "a shoe"

The workdir's task does the work (its ``Task.predict``, tasks/__init__.py); the model is rebuilt from the checkpoint
alone, so no dataset is read. Each image gets one line ``file: summary`` (top-k classes, best queries, class shares,
detections, segments); ``--out`` (default ``<workdir>/predictions``) receives ``predictions.json`` (one record per
image: ``{"file": ..., **the task's record}``, e.g. COCO-style detections), ``<stem>.png`` where the task draws a
picture (a colour mask, boxes on the image; at the image's size) and ``legend.png`` for a colour map.

``--topk``, ``--queries``, ``--score-threshold`` and ``--nms-iou`` go to the tasks that list them in
``predict_options``; giving one to another task is an error naming both. A task that cannot predict (the panoptic
oracle) says why. Folders are read in sorted order (their image files); an image that cannot be read (not an image,
truncated, or a decompression bomb) is named and skipped, and counted at the end. Exit status 1 when no input could
be predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flexivit.files import atomic_write_text
from tasks import Prediction, Run
from tasks.common.images import ImageError, open_image
from tasks.common.precision import PRECISIONS, autocast, autocast_dtype
from tools.arguments import float_above, positive_float, positive_int
from tools.eval import check_patch_sizes, open_run
from tools.lib.deployment import BudgetError, choose

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# The prediction options the command line offers: ``Task.predict_options`` key -> its flag.
OPTION_FLAGS = {"topk": "--topk", "queries": "--queries", "score_threshold": "--score-threshold",
                "nms_iou": "--nms-iou"}  # fmt: skip


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (a score or IoU threshold)."""
    value = float_above(0.0, inclusive=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and folders of images")
    parser.add_argument("--workdir", required=True, help="a training workdir (config.json + checkpoints/)")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--patch-size", type=positive_int)
    size.add_argument(
        "--budget-ms", type=positive_float, help="the patch size tools.deploy measured as best within this"
    )
    options = parser.add_argument_group("prediction options (for the tasks that take them)")
    options.add_argument("--topk", type=positive_int, help="how many classes / queries to list")
    options.add_argument("--queries", nargs="+", help="texts to match or detect (default: the class names)")
    options.add_argument("--score-threshold", type=fraction, help="detections: the lowest score kept")
    options.add_argument("--nms-iou", type=fraction, help="detections: the IoU above which class-wise NMS drops")
    parser.add_argument("--out", help="the folder for predictions.json and images (default: <workdir>/predictions)")
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


def predict_options(task, given: dict) -> dict:
    """The options the user ``given`` (``predict_options`` key -> value, None when not given) that ``task`` takes;
    an exit naming the task and the flag for one it does not take, and its reason when it cannot predict at all."""
    if task.predict is None:
        raise SystemExit(f"task {task.name} does not predict: {task.predict_refusal}")
    given = {key: value for key, value in given.items() if value is not None}
    refused = [OPTION_FLAGS.get(key, key) for key in given if key not in task.predict_options]
    if refused:
        takes = ", ".join(OPTION_FLAGS.get(key, key) for key in task.predict_options) or "no options"
        raise SystemExit(f"task {task.name} does not take {', '.join(refused)} (it takes {takes})")
    return given


def run_predict(run: Run, images: list, patch, options: dict) -> list[Prediction]:
    """``run.task.predict`` on PIL images at one patch size (the caller sets the device and autocast); a task that
    breaks the contract (a wrong count, an image not at the input's size) is named."""
    predictions = run.task.predict(run.model, run.config, run.info, images, patch, options)
    if len(predictions) != len(images):
        raise RuntimeError(
            f"task {run.task.name}: predict gave {len(predictions)} predictions for {len(images)} images"
        )
    for image, p in zip(images, predictions, strict=True):
        if p.image is not None and p.image.size != image.size:
            raise RuntimeError(f"task {run.task.name}: predict drew a {p.image.size} image for a {image.size} input")
    return predictions


def _output_name(path: Path, taken: set) -> str:
    """``path``'s stem, made unique among the files already written (two inputs may share a stem)."""
    name, n = path.stem, 1
    while name in taken:
        name, n = f"{path.stem}_{n}", n + 1
    taken.add(name)
    return name


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    files = list_images(args.inputs)
    run = open_run(args.workdir, args.config, args.set)
    options = predict_options(run.task, {key: getattr(args, key) for key in OPTION_FLAGS})
    patch = args.patch_size if args.patch_size is not None else budget_patch_size(Path(args.workdir), args.budget_ms)
    check_patch_sizes([patch], run.config.data.image_size, "--patch-size", run.task.token_grid)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dtype = autocast_dtype(args.precision, device)
    except ValueError as error:  # fp16 on a CPU
        raise SystemExit(f"--precision: {error}") from None
    run = run._replace(model=run.model.to(device))
    out = Path(args.out) if args.out else Path(args.workdir) / "predictions"

    results, records, skipped, legend = {}, [], [], None
    taken = {"legend", "predictions"}  # stems of the files this run writes besides the images' own
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
        with autocast(device, dtype):
            predictions = run_predict(run, images, patch, options) if images else []
        for path, p in zip(paths, predictions, strict=True):
            results[str(path)] = p.summary
            records.append({"file": str(path), **p.record})
            if p.image is not None:
                out.mkdir(parents=True, exist_ok=True)
                p.image.save(out / f"{_output_name(path, taken)}.png")
            legend = p.legend if legend is None else legend
            tqdm.write(f"{path}: {p.summary}")
        bar.update(len(files[start : start + args.batch]))
    bar.close()
    if not results:  # a run that predicted nothing must not look like success
        raise SystemExit(f"none of the {len(files)} input image(s) could be read: nothing was predicted")
    atomic_write_text(out / "predictions.json", json.dumps(records, indent=1) + "\n")
    if legend is not None:
        legend.save(out / "legend.png")
    print(f"{len(results)} image(s) predicted at patch {patch}" + (f", {len(skipped)} skipped" if skipped else "")
          + f" ({run.task.name}); predictions in {out}")  # fmt: skip
    if skipped:
        print("skipped: " + ", ".join(skipped), file=sys.stderr)
    return {"patch_size": patch, "results": results, "records": records, "skipped": skipped, "out": out}


if __name__ == "__main__":
    main()
