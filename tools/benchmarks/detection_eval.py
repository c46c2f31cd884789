"""Time and memory of the detection evaluation at LVIS v1 val's size, on synthetic ground truth and results.

    python -m tools.benchmarks.detection_eval                   # 20,000 images: LVIS v1 val (~6 min, ~12 GiB)
    python -m tools.benchmarks.detection_eval --images 500      # ~10 s; --images 20 --dets 30: a smoke run

Writes an LVIS-style annotation file (``--images`` 640x480 images, ``--gt-per-image`` boxes each, ``--categories``
classes with LVIS v1's r / c / f proportions 337 / 461 / 405, ``neg_category_ids`` and
``not_exhaustive_category_ids`` per image), streams ``--dets`` synthetic results per image through
:class:`~tasks.detection.evaluation.ResultsWriter` (generated image by image), then measures, each phase in its own
child process so that its peak RSS (``ru_maxrss``) is its own: writing the results, loading them (``json.load``)
and :func:`~tasks.detection.evaluation.lvis_evaluate` (which loads them too). The writer's Python allocations are
also traced (``tracemalloc``) over its first ``--trace-images`` images. Children run under ``nice`` with an
address-space limit (``--mem-limit-gb``) and a timeout (``--timeout-min``), so a too-large run fails on its own
instead of taking the machine down. A markdown table is printed and written to ``--out``/benchmark_<images>.md;
docs/detection.md ("Scale: LVIS v1 evaluation") quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LVIS_V1_FREQUENCIES = {"r": 337, "c": 461, "f": 405}  # LVIS v1 category counts per frequency group
WIDTH, HEIGHT = 640, 480


def _categories(num: int) -> list[dict]:
    total = sum(LVIS_V1_FREQUENCIES.values())
    counts = {f: round(num * n / total) for f, n in LVIS_V1_FREQUENCIES.items()}
    counts["f"] = num - counts["r"] - counts["c"]
    frequencies = [f for f, n in counts.items() for _ in range(n)]
    return [{"id": i + 1, "name": f"class{i + 1}", "frequency": f} for i, f in enumerate(frequencies)]


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random pixel [x, y, w, h] boxes inside the image, sides log-uniform in 8..400 px."""
    w = np.minimum(np.exp(rng.uniform(np.log(8), np.log(400), n)), WIDTH - 1)
    h = np.minimum(np.exp(rng.uniform(np.log(8), np.log(400), n)), HEIGHT - 1)
    return np.stack([rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h], axis=1)


def write_ground_truth(path: Path, images: int, categories: int, per_image: int, seed: int) -> None:
    """An LVIS v1-style file: frequent classes appear more often, ~3 positive classes per image, 6 verified
    negatives and one not-exhaustive positive, a box polygon as each annotation's segmentation."""
    rng = np.random.default_rng(seed)
    cats = _categories(categories)
    weight = np.array([{"r": 1.0, "c": 10.0, "f": 100.0}[c["frequency"]] for c in cats])
    weight /= weight.sum()
    ids = np.array([c["id"] for c in cats])
    image_list, annotations = [], []
    for image_id in range(1, images + 1):
        positives = rng.choice(ids, size=min(3, len(ids)), replace=False, p=weight)
        others = np.setdiff1d(ids, positives)
        negatives = rng.choice(others, size=min(6, len(others)), replace=False)
        image_list.append(
            {
                "id": image_id,
                "width": WIDTH,
                "height": HEIGHT,
                "neg_category_ids": negatives.tolist(),
                "not_exhaustive_category_ids": positives[:1].tolist(),
            }
        )
        for (x, y, w, h), category_id in zip(_boxes(rng, per_image), rng.choice(positives, per_image), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category_id),
                    "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                    "area": float(w * h),
                    "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]],
                    "iscrowd": 0,
                }
            )
    with open(path, "w") as f:
        json.dump({"images": image_list, "annotations": annotations, "categories": cats}, f)


def _by_image(gt: dict) -> dict[int, list]:
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append((a["bbox"], a["category_id"]))
    return by_image


def write_results(gt: dict, path: Path, dets: int, seed: int, limit: int | None = None) -> int:
    """``dets`` results per image, generated and written image by image: a third are jittered ground-truth boxes
    (mostly of the right class), the rest random boxes of a positive / negative class or any class."""
    from tasks.detection.evaluation import ResultsWriter

    by_image = gt.get("_by_image") or _by_image(gt)
    num_categories = len(gt["categories"])
    images = gt["images"][:limit] if limit else gt["images"]
    with ResultsWriter(path) as writer:
        for image in images:
            rng = np.random.default_rng((seed, image["id"]))
            anns = by_image.get(image["id"], [])
            near = min(dets // 3, 3 * len(anns))
            gt_boxes = np.array([b for b, _ in anns] or np.zeros((0, 4)), dtype=float).reshape(-1, 4)
            pick = rng.integers(0, max(1, len(anns)), near)
            jittered = gt_boxes[pick] + rng.normal(0, 0.1, (near, 4)) * gt_boxes[pick][:, [2, 3, 2, 3]]
            jittered[:, 2:] = np.maximum(jittered[:, 2:], 1.0)
            near_cats = np.array([anns[i][1] for i in pick], dtype=int).reshape(-1)
            verified = [c for _, c in anns] + image["neg_category_ids"]
            rest = dets - near
            rest_cats = np.where(
                rng.random(rest) < 0.4,
                rng.choice(verified, rest),
                rng.integers(1, num_categories + 1, rest),
            )
            boxes = np.concatenate([jittered, _boxes(rng, rest)])
            classes = np.concatenate([near_cats, rest_cats])
            scores = np.concatenate([rng.uniform(0.3, 1.0, near), rng.uniform(0.0, 0.6, rest)])
            writer.add(image["id"], classes, boxes, scores)
    return writer.count


# ------------------------------------------------------------------------------------------------ phases (children)


def _phase(args) -> dict:
    out = Path(args.out)
    gt, results = out / f"gt_{args.images}.json", out / f"results_{args.images}.json"
    start = time.perf_counter()
    info: dict = {}
    if args.phase == "ground-truth":
        write_ground_truth(gt, args.images, args.categories, args.gt_per_image, args.seed)
        info["file_mib"] = gt.stat().st_size / 2**20
    elif args.phase == "write":
        import tasks.detection.evaluation  # noqa: F401  (its import cost is not the writer's)

        start = time.perf_counter()
        info["entries"] = write_results(json.loads(gt.read_text()), results, args.dets, args.seed)
        info["file_mib"] = results.stat().st_size / 2**20
    elif args.phase == "write-traced":
        import tracemalloc

        import tasks.detection.evaluation  # noqa: F401

        traced = out / f"results_{args.images}.traced.json"
        gt_data = json.loads(gt.read_text())  # the benchmark's own input and index, not the writer's memory
        gt_data["_by_image"] = _by_image(gt_data)
        start = time.perf_counter()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        info["entries"] = write_results(gt_data, traced, args.dets, args.seed, limit=args.trace_images)
        info["traced_peak_mib"] = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()
        traced.unlink()
    elif args.phase == "import":
        import tasks.detection.evaluation  # noqa: F401
    elif args.phase == "load":
        with open(results) as f:
            info["entries"] = len(json.load(f))
    elif args.phase == "lvis_evaluate":
        from tasks.detection.evaluation import lvis_evaluate

        start = time.perf_counter()
        metrics = lvis_evaluate(gt, results, max_dets=args.dets)
        info["AP"], info["APr"] = round(metrics["AP"], 4), round(metrics["APr"], 4)
    info["wall_s"] = time.perf_counter() - start
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return info


def _limits(mem_gb: float):
    def apply() -> None:
        os.nice(10)
        limit = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _run_child(argv: list[str], phase: str, args) -> dict:
    command = [sys.executable, "-m", "tools.benchmarks.detection_eval", *argv, "--phase", phase]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.timeout_min * 60,
            preexec_fn=_limits(args.mem_limit_gb),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout_min} min"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {done.returncode}: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--categories", type=int, default=1203)
    parser.add_argument("--dets", type=int, default=300)
    parser.add_argument("--gt-per-image", type=int, default=12, help="LVIS v1 val: ~12 boxes per image")
    parser.add_argument("--out", default="runs/benchmarks/detection_eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-images", type=int, default=500, help="images written under tracemalloc")
    parser.add_argument("--mem-limit-gb", type=float, default=15.0, help="address-space limit of each child")
    parser.add_argument("--timeout-min", type=float, default=25.0, help="wall-clock limit of each child")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase:
        print(json.dumps(_phase(args)))
        return

    rows = []
    for phase in ("import", "ground-truth", "write", "write-traced", "load", "lvis_evaluate"):
        info = _run_child(argv, phase, args)
        rows.append((phase, info))
        print(phase, json.dumps(info), flush=True)
        if "error" in info and phase in ("ground-truth", "write"):
            break
    table = [
        f"Detection evaluation benchmark: {args.images} images x {args.categories} categories, {args.dets} "
        f"results per image, {args.gt_per_image} GT boxes per image (synthetic, LVIS v1-style); each phase in its "
        f"own process (peak RSS includes Python + torch, see 'import').",
        "",
        "| phase | wall s | peak RSS MiB | notes |",
        "|---|---:|---:|---|",
    ]
    for phase, info in rows:
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                          if k not in ("wall_s", "peak_rss_mib"))  # fmt: skip
        wall = f"{info['wall_s']:.1f}" if "wall_s" in info else "-"
        rss = f"{info['peak_rss_mib']:.0f}" if "peak_rss_mib" in info else "-"
        table.append(f"| {phase} | {wall} | {rss} | {notes} |")
    text = "\n".join(table) + "\n"
    print(text)
    (out / f"benchmark_{args.images}.md").write_text(text)
    if not args.keep:
        for name in (f"gt_{args.images}.json", f"results_{args.images}.json"):
            (out / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
