"""docs/benchmarks.md from the rows of the speed, compile and input benchmarks: the targets they are held to, a
summary per model, every table, and how to read them (plus benchmarks.csv, benchmarks.png, benchmarks_ratio.png).

Not a command of its own: ``python -m tools.benchmarks`` measures and calls :func:`write_report`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tools.benchmarks import common
from tools.benchmarks.speed import INFERENCE_COLUMNS, PERCENT, TRAIN_COLUMNS
from tools.lib.reporting import markdown_table, plot_sweep, write_csv


def _target(target: str, measured: str, met: bool) -> dict:
    return {"target": target, "measured": measured, "met": "yes" if met else "no"}


def targets(inference: list[dict], training: list[dict], compile_summary: dict | None, batch: int) -> list[dict]:
    """The performance targets, each with what was measured and whether it is met (on FlexiViT-S when measured)."""
    models = list(dict.fromkeys(r["model"] for r in inference))
    model = "S" if "S" in models else (models[0] if models else None)
    cpu = [r for r in inference if r["device"] == "cpu" and r["model"] == model]
    gpu = [r for r in inference if r["device"] == "cuda" and r["model"] == model]
    out = []
    if cpu:
        worst = min(cpu, key=lambda r: r["ours/timm"])
        out.append(_target(
            f"CPU forward throughput >= 1.00x timm at every patch size ({model}, batch {batch}, fp32)",
            f"min {worst['ours/timm']:.3f}x (patch {worst['patch_size']}); max {max(r['ours/timm'] for r in cpu):.3f}x",
            worst["ours/timm"] >= 1.0,
        ))  # fmt: skip
    if gpu:
        worst = min(gpu, key=lambda r: r["ours/timm"])
        out.append(_target(
            f"GPU forward throughput >= 1.00x timm at every patch size ({model}, bf16)",
            f"min {worst['ours/timm']:.3f}x (patch {worst['patch_size']})",
            worst["ours/timm"] >= 1.0,
        ))  # fmt: skip
    for device in dict.fromkeys(r["device"] for r in training):
        train = [r for r in training if r["model"] == model and r["device"] == device]
        if train:
            worst = max(train, key=lambda r: r["flex/fixed cost"])
            out.append(_target(
                f"flexible training step at p <= 1.03x a fixed-p step ({model}, {device})",
                f"max {worst['flex/fixed cost']:.3f}x (patch {worst['patch_size']})",
                worst["flex/fixed cost"] <= 1.03,
            ))  # fmt: skip
    big_grid = [r for r in cpu if r["grid"] >= 8]
    if big_grid:
        worst = max(big_grid, key=lambda r: r["resize share"])
        out.append(_target(
            f"kernel + posemb resize < 1% of a forward at grid >= 8 ({model}, CPU)",
            f"max {100 * worst['resize share']:.2f}% (patch {worst['patch_size']})",
            worst["resize share"] < 0.01,
        ))  # fmt: skip
    fine = [r for r in cpu if r["grid"] >= 15]
    if fine:
        worst = min(fine, key=lambda r: r["ours of peak"])
        timm_range = [100 * r["timm of peak"] for r in fine]
        out.append(_target(
            f"CPU forward >= 85% of the fp32 matmul peak at grid >= 15 ({model})",
            f"ours min {100 * worst['ours of peak']:.0f}% (patch {worst['patch_size']}); "
            f"timm {min(timm_range):.0f}-{max(timm_range):.0f}%",
            worst["ours of peak"] >= 0.85,
        ))  # fmt: skip
    if compile_summary:
        s = compile_summary
        out.append(_target(
            "torch.compile: one graph per patch size, no recompilation when the size changes",
            f"{s['graphs_first_pass']} graphs for {s['sizes']} sizes; {s['graphs_later']} more in {s['steps_later']} "
            f"later steps; {s['graph_breaks']} graph breaks",
            s["graphs_first_pass"] == s["sizes"] and s["graphs_later"] == 0,
        ))  # fmt: skip
    return out


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if values else ""


def summary_rows(inference: list[dict], training: list[dict]) -> list[dict]:
    """Per device and model: the ranges of the ratios over the patch sizes."""
    rows = []
    for device, model in dict.fromkeys((r["device"], r["model"]) for r in inference + training):
        inf = [r for r in inference if r["device"] == device and r["model"] == model]
        train = [r for r in training if r["device"] == device and r["model"] == model]
        rows.append({
            "model": model, "device": device,
            "inference ours/timm": _span([r["ours/timm"] for r in inf]),
            "inference fixed/timm": _span([r["fixed/timm"] for r in inf]),
            "inference flexibility cost": _span([r["ours ms"] / r["fixed ms"] for r in inf]),
            "training ours/timm": _span([r["ours/timm"] for r in train]),
            "training flexibility cost": _span([r["flex/fixed cost"] for r in train]),
        })  # fmt: skip
    return rows


METHOD = """\
- `ours` is the flexible model (32x32 kernel and 7x7 position embedding, both resized in every call); `fixed` is
  the same model after `flexivit.fix_patch_size(model, p, image_size)` (resized weights stored, no resize);
  `timm` is `timm.models.vision_transformer.VisionTransformer` of the same width, depth, heads and patch size.
  Ratios `a/b` are throughput ratios (b's time over a's): above 1 means faster than b.
- `gflops` per image are counted (`tools.lib.profiling`: matmuls, convolutions and attention, a multiply-add
  is 2 FLOPs) and do not include the batch-independent resize. `of peak` = GFLOPs per image x images/s over the
  measured matmul peak (best of square fp32 GEMMs on CPU, bf16 GEMMs on GPU).
- `resize share`: what resizing costs per forward, over the time of the whole forward of the batch: the time of
  the flexible model's patch and position embedding minus the fixed model's (same batch, taking turns, resize
  matrices cached). It is the kernel resize and the position-embedding resize; above the kernel's 32x32 the model
  resizes the patches instead of the kernel, which is cheaper than the fixed model's larger GEMM, hence a
  negative share there.
- Training step: forward, cross-entropy, backward and an SGD update. `flex` is the flexible model at patch p, timed
  right after an untimed step at another patch size (as in a flexible run); `fixed` is a model built for p alone
  (kernel p x p, position grid image/p: no resize at all); `flex/fixed cost` is their time ratio.
- Memory: on GPU the peak of allocated tensors during one call; on CPU the growth of the process's peak resident
  memory during one call (Linux `VmHWM`, reset before each call), which also counts allocator slack.
"""

COMMANDS = """\
Each benchmark is a module of `tools/benchmarks/`, runnable alone (`--help` lists its options, `--quick` is a
smoke run of seconds):

| command | measures | writes |
| --- | --- | --- |
| `python -m tools.benchmarks` | all of this page: speed, training, `--compile`, input pipeline | this page |
| `python -m tools.benchmarks.speed` | inference and training step vs timm per patch size | prints tables |
| `python -m tools.benchmarks.compiled` | `torch.compile` graphs over changing patch sizes | prints tables |
| `python -m tools.benchmarks.input_pipeline` | Fashion-MNIST loader vs the training step | prints tables |
| `python -m tools.benchmarks.precision` | bf16 vs fp32, ONNX Runtime vs eager | benchmarks_deployment.md |
| `python -m tools.benchmarks.sampler` | the training sampler's index cost at 13M items | benchmarks_index.md |
| `python -m tools.benchmarks.detection_eval` | LVIS-v1-sized detection evaluation: time, memory | `--out` |

One-off investigations whose answers are in the docs live in `tools/scripts/` (its README lists them).
"""


def write_report(results: dict, args, argv: list[str]) -> Path:
    """docs/benchmarks.md (``args.out``) with its CSV and plots; ``results`` as built by ``tools.benchmarks``."""
    out = Path(args.out)
    inference, training = results["inference"], results["training"]
    precision = {kind: common.device_precision(args, torch.device(kind)) for kind in ("cpu", "cuda")}
    lines = [
        "# Benchmarks: FlexiViT vs timm's VisionTransformer",
        "",
        "Produced by `python -m tools.benchmarks` (tools/benchmarks/), which also wrote `benchmarks.csv` (every "
        "number), `benchmarks.png` (throughput) and `benchmarks_ratio.png` (throughput relative to timm).",
        "",
        f"- Command: `{common.command('tools.benchmarks', argv)}`",
        f"- Date: {results['date']}; torch {torch.__version__}, timm {results['timm']}",
        *(f"- {device}: {desc}" for device, desc in results["machines"].items()),
        *(f"- Measured matmul peak on {d}: {p:.0f} GFLOP/s" for d, p in results["peaks"].items()),
        f"- Load average (1 min) at start / end: {results['load'][0]:.2f} / {results['load'][1]:.2f} "
        f"on {os.cpu_count()} CPUs: a load near or above the thread count means another job shared the machine "
        "and the timings are noisy.",
        f"- Batch {args.batch_size} on CPU ({precision['cpu']}), {args.gpu_batch_size} on GPU "
        f"({precision['cuda']} autocast); {args.image_size} px;"
        f" {args.warmup} warm-up calls, then {args.repeats} rounds in which the models take turns; medians.",
        "",
        "## Targets",
        "",
        markdown_table(results["targets"]) if results["targets"] else "(nothing measured)\n",
        "## Summary per model",
        "",
        "Ranges are min-max over the patch sizes. `flexibility cost` is the flexible model's time over the fixed",
        "model's (same weights, resize baked in): what the per-call resize costs, and what `fix_patch_size` removes.",
        "",
        markdown_table(summary_rows(inference, training)),
    ]
    for device in results["machines"]:
        for model in dict.fromkeys(r["model"] for r in inference):
            rows = [r for r in inference if r["device"] == device and r["model"] == model]
            if rows:
                lines += [
                    f"## Inference: {model} on {device}",
                    "",
                    markdown_table(rows, INFERENCE_COLUMNS, percent=PERCENT),
                ]
            rows = [r for r in training if r["device"] == device and r["model"] == model]
            if rows:
                lines += [f"## Training step: {model} on {device}", "", markdown_table(rows, TRAIN_COLUMNS)]
    if results["compile"]:
        lines += ["## torch.compile (flexible training, changing patch sizes)", "", markdown_table(results["compile"])]
    if results["input"] or results["input_note"]:
        lines += ["## Input pipeline vs model", ""]
        if results["input"]:
            lines += [markdown_table(results["input"])]
        lines += [results["input_note"] or "", ""]
    lines += ["## How to read this", "", METHOD, "## The benchmark commands", "", COMMANDS]
    path = common.write_text(out / "benchmarks.md", "\n".join(lines))

    csv_rows = [{"section": "inference", **r} for r in inference] + [{"section": "train", **r} for r in training]
    csv_rows += [{"section": "compile", **r} for r in results["compile"]]
    csv_rows += [{"section": "input", **r} for r in results["input"]]
    write_csv(csv_rows, out / "benchmarks.csv")
    plot_rows = [
        {"model": f"{r['model']} {r['device']} {impl}", "patch_size": r["patch_size"], "gflops": r["gflops"],
         "img_per_s": r[f"{impl} img/s"]}
        for r in inference for impl in ("ours", "fixed", "timm")
    ]  # fmt: skip
    plot_sweep(
        plot_rows,
        out / "benchmarks.png",
        metric="img_per_s",
        metric_label="Inference throughput (images / s)",
        x_keys=("gflops", "patch_size"),
        title="FlexiViT (flexible and fixed) vs timm VisionTransformer",
    )
    ratio_rows = [
        {"model": f"{r['model']} {r['device']} {label}", "patch_size": r["patch_size"], "ratio": r[key]}
        for rows, pairs in ((inference, (("ours/timm", "inference ours/timm"), ("fixed/timm", "inference fixed/timm"))),
                            (training, (("ours/timm", "training ours/timm"),)))
        for r in rows for key, label in pairs
    ]  # fmt: skip
    plot_sweep(
        ratio_rows,
        out / "benchmarks_ratio.png",
        metric="ratio",
        metric_label="Throughput relative to timm (> 1: faster)",
        x_keys=("patch_size",),
        title="FlexiViT vs timm, same shape, same inputs",
    )
    return path
