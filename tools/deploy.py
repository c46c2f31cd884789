"""Pick the patch size for a latency or compute budget, measured on the device the model will run on.

    python -m tools.deploy --workdir runs/fashion_mnist --budget-ms 20
    python -m tools.deploy --workdir runs/fashion_mnist --precision bf16 --batch 8 --min-metric 0.85
    python -m tools.deploy --workdir runs/seg --budget-gflops 1.5 --sweep-csv runs/seg/eval/sweep.csv

For every patch size it measures the latency of one batch on this device (median of ``--repeats`` calls, in
``--precision``) of the model a deployment runs: the task model with its backbone fixed to that patch size
(``tools.lib.export.FixedSizeModel``, ``flexivit.fix_patch_size`` inside: no resize per call, what ``tools.export``
writes), and the flexible model's latency beside it (``flexible_ms``); it counts GFLOPs, and takes the task
metric (computed on the validation set, in fp32 and, for bf16 / fp16, in that precision too; or read from a
``tools.eval`` CSV). It prints the Pareto front and the chosen size and writes ``deploy.md`` (the report),
``deploy.csv``, ``front.png`` (metric against latency or GFLOPs, the budget line) and ``choice.json`` (what
``tools.predict --budget-ms`` reads) into ``<workdir>/deploy``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from flexivit.files import atomic_write_text
from tasks.common.precision import PRECISIONS, autocast, autocast_dtype
from tools.arguments import finite_float, positive_float, positive_int
from tools.eval import DESCRIPTIVE, check_patch_sizes, open_run, primary_metric
from tools.lib.deployment import BudgetError, backbone_of, choose, pareto_front
from tools.lib.export import FixedSizeModel
from tools.lib.profiling import count_gflops_fn, device_description, measure_throughput
from tools.lib.reporting import markdown_table, write_csv


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a training workdir of any task (config.json + checkpoints/)")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (CPU: bf16)")
    parser.add_argument("--batch", type=positive_int, default=1, help="images per call whose latency is measured")
    parser.add_argument("--patch-sizes", nargs="+", type=positive_int, help="default: the config's eval.patch_sizes")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-ms", type=positive_float, help="the best metric with latency at most this (ms per batch)"
    )
    budget.add_argument(
        "--budget-gflops", type=positive_float, help="the best metric with at most this many GFLOPs per image"
    )
    budget.add_argument(
        "--min-metric", type=finite_float, help="the fastest size whose metric reaches this (CSV units)"
    )
    parser.add_argument("--metric", help="the metric to judge by (default: accuracy, else the task's first)")
    parser.add_argument("--sweep-csv", help="read the metrics from this tools.eval sweep.csv instead of computing them")
    parser.add_argument(
        "--repeats", type=positive_int, default=10, help="timed calls per patch size (the median is reported)"
    )
    parser.add_argument("--out", help="output folder (default: <workdir>/deploy)")
    return parser.parse_args(argv)


def _metrics(results: dict) -> dict:
    # The names of tools.eval's sweep (top1 is called accuracy there); the sample count is no metric.
    return {("accuracy" if k == "top1" else k): v for k, v in results.items() if k != "n"}


def read_sweep_metrics(path: str | Path, patch_sizes) -> dict:
    """``{patch size: {metric: value}}`` from a ``tools.eval`` sweep.csv (one model's rows)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    models = sorted({row.get("model", "") for row in rows})
    if len(models) > 1:
        raise ValueError(f"{path} holds several models ({', '.join(models)}): give a sweep of the deployed one")
    skip = {*DESCRIPTIVE, "best"}
    table = {}
    for row in rows:
        values = {}
        for key, value in row.items():
            if key in skip or value in ("", None):
                continue
            try:
                values[key] = float(value)
            except ValueError:
                continue
        table[row["patch_size"]] = values
    missing = [p for p in patch_sizes if str(p) not in table]
    if missing:
        raise ValueError(f"{path} has no row for patch size(s) {missing}; it has {sorted(table)}")
    return {p: table[str(p)] for p in patch_sizes}


def measure(task, model, config, patch_sizes, device, *, precision: str, batch: int, repeats: int) -> list[dict]:
    """One row per patch size: grid, GFLOPs per image, latency (ms per batch) and img/s on ``device``.

    ``latency_ms`` / ``img_per_s`` are those of the deployed model (:class:`FixedSizeModel`: kernel and position
    embedding resized once, as exported); ``flexible_ms`` is the flexible model's latency at that size. A task that
    cannot be fixed at one patch size (its ``export_refusal``) is deployed flexible: both are then the same timing.
    """
    dtype = autocast_dtype(precision, device)
    size = config.data.image_size
    image_hw = (size, size) if isinstance(size, int) else tuple(size)
    forward, token_grid = task.image_forward(model), task.token_grid
    channels = backbone_of(model).kwargs["in_chans"]
    example = torch.randn(batch, channels, *image_hw, device=device)
    described = device_description(device)
    rows = []
    for patch in patch_sizes:
        grid = token_grid(image_hw, (patch, patch))
        fn = lambda x, p=patch: forward(x, patch_size=p)  # noqa: E731
        deployed = fn if task.export_refusal else FixedSizeModel(task, model, patch, image_hw)
        with autocast(device, dtype):
            speed = measure_throughput(deployed, example, warmup=2, repeats=repeats)
            flexible = speed if deployed is fn else measure_throughput(fn, example, warmup=2, repeats=repeats)
        del deployed  # a copy of the model per patch size: one at a time
        rows.append(
            {
                "patch_size": patch,
                "grid": f"{grid[0]}x{grid[1]}",
                "gflops": count_gflops_fn(fn, example[:1]),
                "latency_ms": speed["latency_ms"],
                "img_per_s": speed["img_per_s"],
                "flexible_ms": flexible["latency_ms"],
                "device": described,
                "precision": precision,
                "batch": batch,
            }
        )
    return rows


def plot_front(rows: list[dict], front: list[dict], chosen: dict | None, metric: str, path: Path, *, cost: str,
               budget: float | None, title: str) -> Path:  # fmt: skip
    """Metric against cost, every patch size labelled, the Pareto front joined, the budget line and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r[cost] for r in rows], [r[metric] for r in rows], color="0.6", zorder=2, label="patch sizes")
    for row in rows:
        ax.annotate(f"p{row['patch_size']}", (row[cost], row[metric]), textcoords="offset points", xytext=(4, 4))
    ax.plot([r[cost] for r in front], [r[metric] for r in front], "-o", color="C0", zorder=3, label="Pareto front")
    if budget is not None:
        ax.axvline(budget, color="C3", linestyle="--", label=f"budget {budget:g}")
    if chosen is not None:
        ax.scatter([chosen[cost]], [chosen[metric]], marker="*", s=260, color="C1", zorder=4,
                   label=f"chosen: p{chosen['patch_size']}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms per batch)" if cost == "latency_ms" else "GFLOPs per image")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available here")
    run = open_run(args.workdir, args.config, args.set)
    task, config = run.task, run.config
    given = "--patch-sizes" if args.patch_sizes else "the config's eval.patch_sizes"
    patch_sizes = check_patch_sizes(
        args.patch_sizes or config.eval.patch_sizes, config.data.image_size, given, task.token_grid
    )
    if any(not isinstance(p, int) for p in patch_sizes):
        raise SystemExit(f"tools.deploy takes square patch sizes; got {patch_sizes}")
    model = run.model.to(device)

    rows = measure(task, model, config, patch_sizes, device,
                   precision=args.precision, batch=args.batch, repeats=args.repeats)  # fmt: skip
    dtype = autocast_dtype(args.precision, device)
    if args.sweep_csv:
        try:
            metrics = read_sweep_metrics(args.sweep_csv, patch_sizes)
        except (OSError, ValueError, KeyError) as error:  # missing, another model's, or not a tools.eval sweep
            raise SystemExit(f"--sweep-csv: {error}") from None
        source = f"read from {args.sweep_csv}"
    else:
        print(f"evaluating {config.task} at patch sizes {patch_sizes} ...", flush=True)
        _, _, val_set, _ = task.build_datasets(config.data)  # the metric needs the data; the timing does not
        bs = config.eval.batch_size
        metrics = {p: _metrics(r) for p, r in task.evaluate(model, val_set, patch_sizes, device, dtype, bs).items()}
        source = f"computed on the validation set in {args.precision}"
        if dtype is not None:  # the price of the lower precision, per patch size
            reference = task.evaluate(model, val_set, patch_sizes, device, None, bs)
            for patch, values in reference.items():
                for key, value in _metrics(values).items():
                    metrics[patch][f"{key}_fp32"] = value
    for row in rows:
        row.update(metrics[row["patch_size"]])
    metric = args.metric or primary_metric(
        {k: v for k, v in rows[0].items() if k not in ("device", "batch", "flexible_ms")}
    )
    if metric is None:
        raise SystemExit("the task computed no metric to judge by (does its config give validation data?)")
    if metric not in rows[0]:
        raise SystemExit(f"--metric {metric!r} is not among the metrics {sorted(metrics[patch_sizes[0]])}")
    if args.min_metric is not None and args.min_metric > 1 and all(abs(r[metric]) <= 1 for r in rows):
        raise SystemExit(f"--min-metric {args.min_metric:g}: {metric} is a fraction here (e.g. 0.85 for 85 %)")
    if f"{metric}_fp32" in rows[0]:
        for row in rows:
            row[f"{metric}_delta"] = row[metric] - row[f"{metric}_fp32"]

    cost = "gflops" if args.budget_gflops is not None else "latency_ms"
    front = pareto_front(rows, metric, cost)
    for row in rows:
        row["front"] = "yes" if row in front else ""
    chosen, failure = None, None
    try:
        chosen = choose(rows, metric, budget_ms=args.budget_ms, budget_gflops=args.budget_gflops,
                        min_metric=args.min_metric)  # fmt: skip
    except BudgetError as error:
        failure = str(error)
    for row in rows:
        row["chosen"] = "yes" if row is chosen else ""

    out = Path(args.out) if args.out else Path(args.workdir) / "deploy"
    budget = args.budget_ms if args.budget_ms is not None else args.budget_gflops
    what = (
        f"latency <= {args.budget_ms:g} ms per batch of {args.batch}" if args.budget_ms is not None
        else f"<= {args.budget_gflops:g} GFLOPs per image" if args.budget_gflops is not None
        else f"{metric} >= {args.min_metric:g}, fastest"
    )  # fmt: skip
    runtime = time.perf_counter() - started
    percent = [k for k in rows[0] if k.split("_")[0] in ("accuracy", "top5")]  # fractions, shown in % (points)
    columns = ["patch_size", "grid", "gflops", "latency_ms", "flexible_ms", "img_per_s"]
    columns += [k for k in rows[0] if k not in columns + ["device", "precision", "batch", "front", "chosen"]]
    columns += ["front", "chosen"]
    table = markdown_table(rows, columns=columns, percent=percent)
    verdict = (
        f"**Chosen: patch {chosen['patch_size']}** ({chosen['grid']} tokens): {metric} {chosen[metric]:.4g}, "
        f"{chosen['latency_ms']:.3g} ms per batch of {args.batch}, {chosen['gflops']:.3g} GFLOPs per image."
        if chosen else f"**No patch size fits**: {failure}"
    )  # fmt: skip
    report = "\n".join([
        f"# Deployment report: {Path(args.workdir).name}",
        "",
        f"- device: {rows[0]['device']}; precision {args.precision}"
        + (" (autocast)" if dtype is not None else "") + f"; batch {args.batch}",
        f"- latency: median of {args.repeats} calls per patch size, measured by this run on this device, of "
        + (f"the flexible model (this task is not fixed at one patch size: {task.export_refusal})"
           if task.export_refusal else "the deployed model (fixed to each patch size, as tools.export writes it); "
           "flexible_ms: the flexible model at that size"),
        f"- {metric}: {source}",
        f"- budget: {what}",
        f"- this report took {runtime:.1f} s to make",
        "",
        verdict,
        "",
        table,
        "",
        "front: no other patch size is both cheaper"
        f" ({'GFLOPs' if cost == 'gflops' else 'latency'}) and at least as good; chosen: the best within the budget.",
        "",
        "![front](front.png)",
        "",
    ])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "deploy.csv")
    atomic_write_text(out / "deploy.md", report)
    title = f"{Path(args.workdir).name}: {metric} per patch size ({args.precision}, {device.type})"
    plot_front(rows, front, chosen, metric, out / "front.png", cost=cost, budget=budget, title=title)
    choice = {
        "workdir": str(args.workdir),
        "checkpoint": str(run.checkpoint),
        "metric": metric,
        "budget": what,
        "chosen": chosen,
        "failure": failure,
        "rows": rows,
    }
    atomic_write_text(out / "choice.json", json.dumps(choice, indent=2) + "\n")
    print(table)
    print(f"\n{verdict}\nwrote {out / 'deploy.md'}, {out / 'deploy.csv'}, {out / 'front.png'} ({runtime:.1f} s)")
    if chosen is None:
        raise SystemExit(2)
    return choice


if __name__ == "__main__":
    main()
