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
from pathlib import Path

import torch

from flexivit.checkpoint import CheckpointError, read_checkpoint
from tasks.common.config import Config, ConfigError, apply_overrides, load_config
from tasks.common.deployment import PRECISIONS, autocast, autocast_dtype
from tasks.common.profiling import count_gflops_fn, device_description, measure_throughput
from tasks.common.reporting import markdown_table, plot_sweep, write_csv, write_markdown
from tasks.common.train_state import latest_checkpoint, state_dict_mismatch
from tasks.common.workdir import read_config
from tools.arguments import positive_int

# The columns of a sweep row that describe the measurement; the others are the task's metrics.
DESCRIPTIVE = ("model", "precision", "patch_size", "grid", "tokens", "gflops", "img_per_s", "latency_ms")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", nargs="+", default=[], help="training workdirs (config.json + checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint file instead of a workdir (needs --config)")
    parser.add_argument("--config", help="config for --checkpoint, or to override a workdir's data settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--names", nargs="+", help="a display name per model (default: workdir names)")
    parser.add_argument("--patch-sizes", nargs="+", type=positive_int, help="default: the config's eval.patch_sizes")
    parser.add_argument("--out", help="output folder (default: <first workdir>/eval)")
    parser.add_argument("--timing-batch", type=positive_int, default=32, help="batch size for img/s and latency")
    parser.add_argument("--no-timing", action="store_true", help="skip the speed measurements")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (CPU: bf16)")
    return parser.parse_args(argv)


def _sources(args) -> list[tuple[str, Config, Path]]:
    """``(name, config, checkpoint path)`` per model to evaluate."""
    if args.checkpoint:
        if not args.config:
            raise SystemExit("--checkpoint needs --config (for the data and the task)")
        if not Path(args.checkpoint).is_file():
            raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
        sources = [(Path(args.checkpoint).stem, config_file(args.config, args.set), Path(args.checkpoint))]
    elif args.workdir:
        sources = [(Path(w).name, *workdir_source(w, args.config, args.set)) for w in args.workdir]
    else:
        raise SystemExit("give --workdir DIR [DIR ...] or --checkpoint FILE --config CONFIG")
    if args.names:
        if len(args.names) != len(sources):
            raise SystemExit(f"--names has {len(args.names)} names for {len(sources)} models")
        sources = [(name, c, p) for name, (_, c, p) in zip(args.names, sources, strict=True)]
    return sources


def workdir_source(workdir: str | Path, config: str | None = None, overrides=()) -> tuple[Config, Path]:
    """``(config, last checkpoint)`` of a training workdir; ``config`` (a config file) replaces its config.json, and
    ``overrides`` (``--set`` strings) apply on top.

    Every tool reads a workdir through here: a missing or damaged config.json, a bad override, or no checkpoint
    ends the tool with one line naming the file or key and the way out.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise SystemExit(f"{workdir}: no such workdir")
    if not path.is_file():
        raise SystemExit(f"{workdir} has no config.json: is it a training workdir?")
    ckpt = latest_checkpoint(workdir)
    if ckpt is None:
        raise SystemExit(f"{workdir} has no checkpoint under checkpoints/")
    if config:
        return config_file(config, overrides), ckpt
    try:
        saved = read_config(path)
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    return _with_overrides(saved, overrides), ckpt


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
    list is empty or a patch is larger than the image: ``token_grid`` (a task's :func:`task_token_grid`, default
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
    size = config.data.image_size
    given = "--patch-sizes" if patch_sizes else f"eval.patch_sizes of {name}'s config"
    patches = check_patch_sizes(patch_sizes or config.eval.patch_sizes, size, given, task_token_grid(task))
    _, _, val_set, info = task.build_datasets(config.data)
    model = load_task_model(task, config, info, checkpoint).to(device).eval()
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
    """``fn(image_hw, (ph, pw)) -> (gh, gw)``: the backbone's (:func:`backbone_token_grid`), unless a task that pads
    says so with its own ``token_grid``."""
    return getattr(task, "token_grid", backbone_token_grid)


def backbone_token_grid(image_hw, patch) -> tuple[int, int]:
    """The backbone's token grid: it drops the border that the patches do not tile."""
    return (image_hw[0] // patch[0], image_hw[1] // patch[1])


def load_task_model(task, config: Config, info, checkpoint: Path) -> torch.nn.Module:
    """The task's model with the weights of ``checkpoint`` (a training checkpoint or a saved model).

    A checkpoint of another architecture ends the tool with one line naming the file and the parameters that differ
    (shape in the file and in the model), not torch's size-mismatch text.
    """
    model_cfg = Config({**config.model, "init": None})  # the checkpoint holds the weights
    model = task.build_model(model_cfg, info)
    try:
        state, _ = read_checkpoint(checkpoint)
    except CheckpointError as e:  # a truncated or foreign file, named
        raise SystemExit(str(e)) from e
    problems = state_dict_mismatch(model.state_dict(), state, limit=3)
    if problems:
        raise SystemExit(
            f"{checkpoint} does not fit the {config.task} model of the config ({config.model.name}): "
            f"{'; '.join(problems)}. Give the config it was trained with (--config)"
        )
    model.load_state_dict(state)
    return model


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
