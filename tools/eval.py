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
import importlib
import json
from pathlib import Path

import torch

from flexivit.checkpoint import read_checkpoint
from tasks.common.config import Config, apply_overrides, load_config
from tasks.common.deployment import PRECISIONS, autocast, autocast_dtype
from tasks.common.profiling import count_gflops_fn, device_description, measure_throughput
from tasks.common.reporting import markdown_table, plot_sweep, write_csv, write_markdown
from tasks.common.train_state import latest_checkpoint

# The columns of a sweep row that describe the measurement; the others are the task's metrics.
DESCRIPTIVE = ("model", "precision", "patch_size", "grid", "tokens", "gflops", "img_per_s", "latency_ms")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", nargs="+", default=[], help="training workdirs (config.json + checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint file instead of a workdir (needs --config)")
    parser.add_argument("--config", help="config for --checkpoint, or to override a workdir's data settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--names", nargs="+", help="a display name per model (default: workdir names)")
    parser.add_argument("--patch-sizes", nargs="+", type=int, help="default: the config's eval.patch_sizes")
    parser.add_argument("--out", help="output folder (default: <first workdir>/eval)")
    parser.add_argument("--timing-batch", type=int, default=32, help="batch size for img/s and latency")
    parser.add_argument("--no-timing", action="store_true", help="skip the speed measurements")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (CPU: bf16)")
    return parser.parse_args(argv)


def _sources(args) -> list[tuple[str, Config, Path]]:
    """``(name, config, checkpoint path)`` per model to evaluate."""
    if args.checkpoint:
        if not args.config:
            raise SystemExit("--checkpoint needs --config (for the data and the task)")
        sources = [(Path(args.checkpoint).stem, load_config(args.config), Path(args.checkpoint))]
    elif args.workdir:
        sources = [(Path(w).name, *workdir_source(w, args.config)) for w in args.workdir]
    else:
        raise SystemExit("give --workdir DIR [DIR ...] or --checkpoint FILE --config CONFIG")
    if args.names:
        if len(args.names) != len(sources):
            raise SystemExit(f"--names has {len(args.names)} names for {len(sources)} models")
        sources = [(name, c, p) for name, (_, c, p) in zip(args.names, sources, strict=True)]
    return [(name, apply_overrides(config, args.set), path) for name, config, path in sources]


def workdir_source(workdir: str | Path, config: str | None = None) -> tuple[Config, Path]:
    """``(config, last checkpoint)`` of a training workdir; ``config`` (a config file) replaces its config.json."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json: is it a training workdir?")
    ckpt = latest_checkpoint(workdir)
    if ckpt is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint under checkpoints/")
    return (load_config(config) if config else Config(json.loads((workdir / "config.json").read_text()))), ckpt


def sweep(
    name: str, config: Config, checkpoint: Path, patch_sizes, device, *, timing_batch=32, timing=True, precision="fp32"
) -> list:
    """One row per patch size for one model: the task's metrics plus grid, tokens, GFLOPs, img/s and latency.

    The task builds the model (``build_model``), the checkpoint's ``model`` state dict fills it, and the task's
    ``image_forward(model)`` (default: the model itself) is counted and timed, called as ``fn(x, patch_size=p)``.
    ``precision`` bf16 / fp16 runs the metrics and the timing under autocast (GFLOPs do not depend on it).
    """
    dtype = autocast_dtype(precision, device)
    task = importlib.import_module(f"tasks.{config.task}")
    _, _, val_set, info = task.build_datasets(config.data)
    model = load_task_model(task, config, info, checkpoint).to(device).eval()
    patches = [p if isinstance(p, int) else tuple(p) for p in patch_sizes or config.eval.patch_sizes]
    size = config.data.image_size
    image_hw = (size, size) if isinstance(size, int) else tuple(size)
    results = task.evaluate(model, val_set, patches, device, dtype, config.eval.batch_size)
    forward, token_grid = image_forward(task, model), task_token_grid(task)
    # Speed does not depend on pixel values: time a synthetic batch of the configured size (validation images may
    # differ in size, e.g. ADE20k).
    example = torch.randn(timing_batch, 3, *image_hw, device=device)
    rows = []
    for patch in patches:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        grid = token_grid(image_hw, (ph, pw))
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


def image_forward(task, model: torch.nn.Module):
    """What is counted and timed per patch size: the task's ``image_forward(model)``, by default the model itself."""
    return getattr(task, "image_forward", lambda m: m)(model)


def task_token_grid(task):
    """``fn(image_hw, (ph, pw)) -> (gh, gw)``: the backbone drops a border that the patches do not tile; a task that
    pads instead says so with its own ``token_grid``."""
    return getattr(task, "token_grid", lambda hw, p: (hw[0] // p[0], hw[1] // p[1]))


def load_task_model(task, config: Config, info, checkpoint: Path) -> torch.nn.Module:
    """The task's model with the weights of ``checkpoint`` (a training checkpoint or a saved model)."""
    model_cfg = Config({**config.model, "init": None})  # the checkpoint holds the weights
    model = task.build_model(model_cfg, info)
    state, _ = read_checkpoint(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit the {config.task} model: missing {missing}, unexpected {unexpected}"
        )
    return model


def primary_metric(row: dict) -> str:
    """The metric a sweep is judged by: accuracy for classification, else the task's first metric."""
    return "accuracy" if "accuracy" in row else next(k for k in row if k not in DESCRIPTIVE + ("best",))


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
    for name, config, checkpoint in sources:
        print(f"evaluating {name} ({checkpoint}) ...", flush=True)
        rows += sweep(
            name,
            config,
            checkpoint,
            args.patch_sizes,
            device,
            timing_batch=args.timing_batch,
            timing=not args.no_timing,
            precision=args.precision,
        )
    metric = primary_metric(rows[0])
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
