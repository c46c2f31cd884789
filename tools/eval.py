"""Evaluate trained models at a list of patch sizes: task metric, compute and speed per patch size.

    python -m tools.eval --workdir runs/fashion_mnist
    python -m tools.eval --workdir runs/flexi runs/vit_p8 --names FlexiViT ViT-p8 --out runs/compare
    python -m tools.eval --checkpoint model.safetensors --config configs/classification/fashion_mnist.py

For every model and patch size it writes grid, tokens, forward GFLOPs per image (counted), measured img/s and
latency on this device, and the task metrics, as ``sweep.csv``, ``sweep.md`` and ``sweep.png`` (metric against
GFLOPs and against img/s, one line per model: the shape of the paper's Fig. 2 and Fig. 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flexivit.files import CheckpointError
from tasks import Run, RunError, TaskError, backbone_token_grid, load_run
from tasks.common.config import Config, ConfigError, apply_overrides, load_config
from tasks.common.loader import eval_loading
from tasks.common.precision import PRECISIONS, autocast, autocast_dtype, use_tf32
from tasks.common.train_state import CheckpointMismatchError
from tools.arguments import positive_int
from tools.lib.profiling import count_gflops_fn, device_description, measure_throughput
from tools.lib.reporting import markdown_table, plot_sweep, write_csv, write_markdown

# The columns of a sweep row that describe the measurement; the others are the task's metrics.
DESCRIPTIVE = ("model", "precision", "patch_size", "grid", "tokens", "gflops", "img_per_s", "latency_ms")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", nargs="+", default=[], help="training workdirs (config.json + checkpoints/)")
    parser.add_argument("--checkpoint", help="a training checkpoint file instead of a workdir (it holds its config)")
    parser.add_argument("--config", help="a config to use instead of the saved one (e.g. other data)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--names", nargs="+", help="a display name per model (default: workdir names)")
    parser.add_argument("--patch-sizes", nargs="+", type=positive_int, help="default: the config's eval.patch_sizes")
    parser.add_argument("--out", help="output folder (default: <first workdir>/eval)")
    parser.add_argument("--timing-batch", type=positive_int, default=32, help="batch size for img/s and latency")
    parser.add_argument("--no-timing", action="store_true", help="skip the speed measurements")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (CPU: bf16)")
    return parser.parse_args(argv)


def _sources(args) -> list[tuple[str, Run]]:
    """``(name, run)`` per model to evaluate."""
    if args.checkpoint:
        sources = [(Path(args.checkpoint).stem, open_run(args.checkpoint, args.config, args.set))]
    elif args.workdir:
        sources = [(Path(w).name, open_run(w, args.config, args.set)) for w in args.workdir]
    else:
        raise SystemExit("give --workdir DIR [DIR ...] or --checkpoint FILE")
    if args.names:
        if len(args.names) != len(sources):
            raise SystemExit(f"--names has {len(args.names)} names for {len(sources)} models")
        sources = [(name, run) for name, (_, run) in zip(args.names, sources, strict=True)]
    return sources


def open_run(source: str | Path, config: str | None = None, overrides=()) -> Run:
    """:func:`tasks.load_run` for a tool: the model rebuilt from the workdir's newest checkpoint (or a checkpoint
    file) alone; ``config`` (a config file) replaces the saved config and ``overrides`` (``--set`` strings) apply on
    top, e.g. to evaluate on other data. Every problem ends the tool with one line naming the file or key."""
    try:
        run = load_run(source, config_file(config, overrides) if config else None)
    except (RunError, TaskError, CheckpointError, CheckpointMismatchError, ConfigError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from e
    if overrides and not config:
        run = run._replace(config=_with_overrides(run.config, overrides))
    return run


def config_file(spec: str, overrides=()) -> Config:
    """``load_config(spec)`` with ``overrides``; a missing file or a bad override ends the tool with one line."""
    try:
        config = load_config(spec)
    except (FileNotFoundError, ValueError) as e:  # tasks.common.config's errors are ValueErrors
        raise SystemExit(str(e)) from e
    return _with_overrides(config, overrides)


def _with_overrides(config: Config, overrides) -> Config:
    try:
        return apply_overrides(config, list(overrides))
    except (KeyError, ValueError) as e:  # an unknown key, or a value of the wrong type
        raise SystemExit(f"--set: {e.args[0] if e.args else e}") from e


def check_patch_sizes(patch_sizes, image_size, what: str = "--patch-sizes", token_grid=None) -> list:
    """``patch_sizes`` (ints or (h, w) pairs), or an exit naming ``what``, the sizes and the image size when the
    list is empty or a patch is larger than the image: ``token_grid`` (the task's, default
    :func:`backbone_token_grid`) would be empty."""
    if not patch_sizes:
        raise SystemExit(f"{what} is empty: no patch size to run at (give --patch-sizes)")
    image_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    patches = [p if isinstance(p, int) else tuple(p) for p in patch_sizes]
    token_grid = token_grid or backbone_token_grid
    too_large = [p for p in patches if min(token_grid(image_hw, (p, p) if isinstance(p, int) else p)) < 1]
    if too_large:
        raise SystemExit(
            f"{what}: patch size {', '.join(map(str, too_large))} is larger than the {image_hw[0]}x{image_hw[1]} "
            "images (not one patch fits)"
        )
    return patches


def sweep(name: str, run: Run, patch_sizes, device, *, timing_batch=32, timing=True, precision="fp32") -> list:
    """One row per patch size for one model: the task's metrics plus grid, tokens, GFLOPs, img/s and latency.

    The task's ``image_forward(model)`` is counted and timed, called as ``fn(x, patch_size=p)``; the metrics need the
    validation data, so this is where the data is read. ``precision`` bf16 / fp16 runs the metrics and the timing
    under autocast (GFLOPs do not depend on it).
    """
    dtype = autocast_dtype(precision, device)
    task, config = run.task, run.config
    size = config.data.image_size
    given = "--patch-sizes" if patch_sizes else f"eval.patch_sizes of {name}'s config"
    patches = check_patch_sizes(patch_sizes or config.eval.patch_sizes, size, given, task.token_grid)
    _, _, val_set, _ = task.build_datasets(config.data)
    model = run.model.to(device).eval()
    image_hw = (size, size) if isinstance(size, int) else tuple(size)
    use_tf32(precision)  # fp32 on a GPU: TF32 matmuls, as the engine trains
    with eval_loading(num_workers=config.data.get("num_workers", 0), pin_memory=device.type == "cuda"):
        results = task.evaluate(model, val_set, patches, device, dtype, config.eval.batch_size)
    forward = task.image_forward(model)
    # Speed does not depend on pixel values: time a synthetic batch of the configured size (validation images may
    # differ in size, e.g. ADE20k).
    example = torch.randn(timing_batch, 3, *image_hw, device=device)
    rows = []
    for patch in patches:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        grid = task.token_grid(image_hw, (ph, pw))
        row = {"model": name, "precision": precision, "patch_size": patch if isinstance(patch, int) else f"{ph}x{pw}",
               "grid": f"{grid[0]}x{grid[1]}", "tokens": grid[0] * grid[1],
               "gflops": count_gflops_fn(lambda x, p=patch: forward(x, patch_size=p), example)}  # fmt: skip
        if timing:
            with autocast(device, dtype):
                speed = measure_throughput(lambda x, p=patch: forward(x, patch_size=p), example, warmup=2, repeats=5)
            row.update(img_per_s=speed["img_per_s"], latency_ms=speed["latency_ms"])
        row.update({("accuracy" if k == "top1" else k): v for k, v in results[patch].items() if k != "n"})
        rows.append(row)
    return rows


def primary_metric(row: dict) -> str:
    """The metric a sweep is judged by: accuracy for classification, else the task's first metric."""
    return "accuracy" if "accuracy" in row else next((k for k in row if k not in DESCRIPTIVE + ("best",)), None)


def mark_best(rows: list[dict], metric: str) -> None:
    """Set ``best`` to "yes" on each model's row with the highest ``metric`` (ties: fewer GFLOPs), "" elsewhere.

    The paper finds that the best inference patch size differs per dataset (Sec. 5.3): the table names it.
    """
    for name in dict.fromkeys(row["model"] for row in rows):
        members = [row for row in rows if row["model"] == name and isinstance(row.get(metric), int | float)]
        best = max(members, key=lambda row: (row[metric], -row.get("gflops", 0.0)), default=None)
        for row in rows:
            if row["model"] == name:
                row["best"] = "yes" if row is best else ""


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sources = _sources(args)
    out = (
        Path(args.out)
        if args.out
        else (Path(args.workdir[0]) if args.workdir else Path(args.checkpoint).parent) / "eval"
    )
    rows = []
    for name, run in sources:
        print(f"evaluating {name} ({run.checkpoint}) ...", flush=True)
        rows += sweep(
            name,
            run,
            args.patch_sizes,
            device,
            timing_batch=args.timing_batch,
            timing=not args.no_timing,
            precision=args.precision,
        )
    metric = primary_metric(rows[0])
    if metric is None:
        raise SystemExit(f"{rows[0]['model']}: the task computed no metric (does its config give validation data?)")
    percent = [k for k in ("accuracy", "top5") if k in rows[0]]
    columns = [c for c in DESCRIPTIVE if c in rows[0]]
    columns += [k for k in rows[0] if k not in columns]
    mark_best(rows, metric)
    columns.append("best")
    notes = [
        f"device: {device_description(device)}; img/s and latency at batch {args.timing_batch}, median of 5; "
        f"precision {args.precision}" + (" (autocast)" if args.precision != "fp32" else ""),
        "GFLOPs: forward, per image, counted with torch.utils.flop_counter (a multiply-add = 2 FLOPs)",
        f"best: the patch size with the highest {metric} for that model (ties: the cheaper one)",
    ]
    write_csv(rows, out / "sweep.csv")
    write_markdown(rows, out / "sweep.md", title="Patch-size sweep", notes=notes, columns=columns, percent=percent)
    plot_sweep(rows, out / "sweep.png", metric=metric, title=f"{metric} and cost per patch size")
    print(markdown_table(rows, columns=columns, percent=percent))
    print(f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    return rows


if __name__ == "__main__":
    main()
