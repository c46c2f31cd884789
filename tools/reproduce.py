"""Small-scale reproduction of the paper's Fig. 3, Fig. 8 and Fig. 4 on real data, on a CPU in about half an hour.

    python -m tools.reproduce                      # writes docs/reproduction.md and docs/reproduction_*.png
    python -m tools.reproduce --steps-scale 0.02   # a fast smoke run of the whole pipeline (numbers meaningless)

All models are the embedded default's shape (width 128, depth 4, 48 px Fashion-MNIST, patch sizes 16..4) and go
through the same ``tools.train`` / ``tools.eval`` code as any user run; each run lives in its own workdir under
``--workdir`` and is skipped when already finished, so an interrupted reproduction continues where it stopped.

1. Fig. 3: a ViT trained at patch 8, one at patch 16, a FlexiViT and a FlexiViT distilled from the p8 ViT (student
   initialised from the teacher, Sec. 3.5), each evaluated at every patch size. All four are pretrained on the first
   half of Fashion-MNIST's training images.
2. Fig. 8: fast transfer, trained at the largest patch size only and evaluated at all. In-domain, as the paper's
   ImageNet-21k -> ImageNet-1k: a new head on the other half of the training images (same classes, images never
   seen), trained at p16 on the frozen backbone or fine-tuned end to end at p16 (plain and with a consistency term
   across patch sizes), beside the fixed p16 ViT transferred the same way. ``--unseen-classes`` adds the harder
   split (pretrain on classes 0-4, transfer to 5-9). Cross-domain: Fashion-MNIST -> MNIST-5k, fine-tuned at p16 plain,
   with the consistency term, and flexified.
3. Fig. 4: the p8 ViT evaluated with image and patch scaled together, kernel PI-resized vs bilinearly resized.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import flexivit
from flexivit.files import atomic_write
from tasks import classification
from tasks.common.config import Config
from tasks.common.train_state import latest_checkpoint
from tools import eval as eval_tool
from tools import train
from tools.lib.profiling import device_description
from tools.lib.reporting import markdown_table, plot_sweep

FMNIST = "configs/classification/fashion_mnist.py"
DISTILL = "configs/classification/fashion_mnist_distill.py"
# In-domain split (the analogue of ImageNet-21k -> ImageNet-1k): pretrain on one half of the training images,
# transfer on the other half, same classes, a new head; test on the official test split.
PRETRAIN, TRANSFER = "data.train_split='train[:50%]'", "data.train_split='train[50%:]'"
SIZES = [16, 12, 8, 6, 4]
EVAL_SIZES = [24, 16, 12, 8, 6, 4]
# Written by hand after looking at the numbers; the report includes it, so a rerun keeps it.
DISCUSSION = Path(__file__).resolve().parent.parent / "docs" / "reproduction_discussion.md"
OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]  # in-domain split of Fashion-MNIST's classes
# A linear probe on the frozen backbone: every parameter but the head frozen.
HEAD_ONLY = ["optim.frozen=['^(?!head\\\\.)']", "optim.lr=0.003", "optim.weight_decay=0.0"]
# Full fine-tuning at one patch size, as in the paper's Fig. 8 (a lower learning rate than pretraining).
FINE_TUNE = ["optim.lr=0.0001"]
FINE_TUNE_MNIST = ["optim.lr=0.0005"]
AT16 = ["patch_sizes={'kind': 'fixed', 'sizes': [16]}"]  # transfer at the largest (cheapest) patch size only
# The recipe of the committed report. The main job's defaults in fashion_mnist.py have moved on since (curriculum,
# bf16, no crop: docs/main_job.md), so every run pins what it would otherwise inherit from them.
REPORT_RECIPE = ["data.crop_scale=[0.6, 1.0]", "train.precision='fp32'"]
UNIFORM = [f"patch_sizes={{'kind': 'uniform', 'sizes': {SIZES}}}"]  # the flexible runs' sampler


class Runner:
    def __init__(self, workdir: Path, steps_scale: float, val_examples: int | None = None, seed: int = 0):
        self.workdir, self.steps_scale, self.timings = workdir, steps_scale, {}
        self.trained_now = 0.0  # seconds spent training in this invocation (the rest of the timings are reused)
        self.val_examples = val_examples
        self.common = [f"seed={seed}"] + ([f"data.val_examples={val_examples}"] if val_examples else [])

    def train(self, name: str, config: str, steps: int, *sets: str) -> Path:
        """Train (or finish training) one model; returns its workdir."""
        workdir = self.workdir / name
        steps = max(2, int(steps * self.steps_scale))
        ckpt = latest_checkpoint(workdir)
        timing_file = workdir / "train_seconds.json"
        if ckpt is not None and torch.load(ckpt, weights_only=True)["step"] >= steps:
            print(f"[reproduce] {name}: done already", flush=True)
            if timing_file.exists():  # keep the report's timing table complete when a reproduction is resumed
                self.timings[name] = json.loads(timing_file.read_text())["seconds"]
            return workdir
        print(f"\n[reproduce] {name}: {steps} steps", flush=True)
        start = time.perf_counter()
        warmup = max(1, min(100, steps // 10))
        train.main(
            [
                "--config",
                config,
                "--workdir",
                str(workdir),
                "--resume",
                "--set",
                f"train.steps={steps}",
                f"optim.warmup_steps={warmup}",
                "train.ckpt_every=1000000",
                "eval.every=0",
                f"eval.patch_sizes=[{SIZES[0]}]",  # a quick check only: the sweep below evaluates every size
                *REPORT_RECIPE,
                *(UNIFORM if config == FMNIST else []),
                *self.common,
                *sets,
            ]
        )
        self.timings[name] = time.perf_counter() - start
        self.trained_now += self.timings[name]
        timing_file.write_text(json.dumps({"seconds": self.timings[name]}))
        return workdir

    def sweep(self, label: str, workdir: Path) -> list[dict]:
        """Accuracy and GFLOPs at every evaluated size; kept in the workdir, so a rerun only rewrites the report."""
        checkpoint = latest_checkpoint(workdir)
        cache = workdir / "reproduce_sweep.json"
        key = {"checkpoint": checkpoint.name, "sizes": EVAL_SIZES, "val_examples": self.val_examples}
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached.get("key") == key:
            rows = cached["rows"]
        else:
            run = eval_tool.open_run(workdir)
            rows = eval_tool.sweep(label, run, EVAL_SIZES, torch.device("cpu"), timing=False)
            atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "rows": rows})))
        return [{**row, "model": label} for row in rows]


def scaled_resize_eval(workdir: Path, scales=(0.5, 0.75, 1.0, 1.5, 2.0)) -> list[dict]:
    """Fig. 4: image and patch scaled by the same factor (the token grid stays), kernel resized two ways."""
    config = Config(json.loads((workdir / "config.json").read_text()))
    model = flexivit.load_model(latest_checkpoint(workdir)).eval()
    base_patch, base_image = model.patch_size[0], config.data.image_size
    rows = []
    for scale in scales:
        data = copy.deepcopy(config.data)
        data.image_size = round(base_image * scale)
        patch = round(base_patch * scale)
        _, _, val_set, _ = classification.build_datasets(data)
        for method in ("pi", "bilinear"):
            model.patch_embed.kernel_resize = method
            top1 = classification.evaluate(model, val_set, [patch], torch.device("cpu"), batch_size=500)[patch]["top1"]
            rows.append(
                {
                    "model": f"{method} resize",
                    "scale": scale,
                    "image_size": data.image_size,
                    "patch_size": patch,
                    "accuracy": top1,
                }
            )
    model.patch_embed.kernel_resize = "pi"
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="default: runs/reproduce, or runs/reproduce_seed<N> with --seed N")
    parser.add_argument("--out", help="default: docs, or docs/seed<N> with --seed N")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (init, data order, patch sizes)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's steps (smoke runs)")
    parser.add_argument("--val-examples", type=int, help="evaluate on a random subset (smoke runs)")
    parser.add_argument(
        "--unseen-classes", action="store_true", help="also transfer to classes unseen in pretraining (+~15 min)"
    )
    args = parser.parse_args(argv)
    suffix = f"_seed{args.seed}" if args.seed else ""
    workdir = Path(args.workdir or f"runs/reproduce{suffix}")
    out = Path(args.out or (f"docs/seed{args.seed}" if args.seed else "docs"))
    run = Runner(workdir, args.steps_scale, args.val_examples, args.seed)
    started = time.perf_counter()

    # ---------------------------------------------------------------------------------- 1. Fig. 3: fixed vs flexible
    # Every backbone is pretrained on the first half of the training images; the second half is the in-domain
    # transfer set of section 2 (images never seen in pretraining, the same label space: ImageNet-21k -> 1k).
    vit8 = run.train("vit_p8", f"{FMNIST}:fixed=8", 1000, PRETRAIN)
    vit16 = run.train("vit_p16", f"{FMNIST}:fixed=16", 1000, PRETRAIN)
    flexi = run.train("flexivit", FMNIST, 1200, PRETRAIN)
    distilled = run.train("flexivit_distilled", f"{DISTILL}:teacher={vit8}", 800, PRETRAIN)
    fig3 = run.sweep("ViT-p8", vit8) + run.sweep("ViT-p16", vit16) + run.sweep("FlexiViT", flexi)
    fig3 += run.sweep("FlexiViT distilled from ViT-p8", distilled)

    # ---------------------------------------------------------------------------------- 2a. Fig. 8 in-domain
    consistency = ["train.consistency.weight=1.0", f"train.consistency.sizes={SIZES[1:]}"]
    transfer = [TRANSFER, "model.new_head=True", *AT16]
    in_domain = []
    for label, name, source, extra in [
        ("FlexiViT, head at p16", "transfer_flexivit_head", flexi, HEAD_ONLY),
        ("FlexiViT distilled, head at p16", "transfer_distilled_head", distilled, HEAD_ONLY),
        ("ViT-p16, head at p16", "transfer_vit_p16_head", vit16, HEAD_ONLY),
        ("FlexiViT distilled, fine-tuned at p16", "transfer_distilled_ft", distilled, FINE_TUNE),
        (
            "FlexiViT distilled, fine-tuned at p16 + consistency",
            "transfer_distilled_ft_cons",
            distilled,
            FINE_TUNE + consistency,
        ),
        ("ViT-p16, fine-tuned at p16", "transfer_vit_p16_ft", vit16, FINE_TUNE),
    ]:
        config = f"{FMNIST}:fixed=16" if source == vit16 else FMNIST
        workdir = run.train(name, config, 300, *transfer, f"model.init='{source}'", *extra)
        in_domain += run.sweep(label, workdir)
    if args.unseen_classes:
        in_domain += unseen_classes(run, consistency)

    # ---------------------------------------------------------------------------------- 2b. Fig. 8 cross-domain
    mnist = ["data.name='mnist5k'", "data.hflip=False", "model.new_head=True", f"model.init='{distilled}'"]
    cross = []
    for label, name, extra in [
        ("FlexiViT distilled, fine-tuned at p16", "mnist_distilled_p16", AT16 + FINE_TUNE_MNIST),
        (
            "FlexiViT distilled, fine-tuned at p16 + consistency",
            "mnist_distilled_p16_cons",
            AT16 + FINE_TUNE_MNIST + consistency,
        ),
        ("FlexiViT distilled, flexified transfer (random sizes)", "mnist_distilled_flexi", FINE_TUNE_MNIST),
    ]:
        cross += run.sweep("MNIST: " + label, run.train(name, FMNIST, 300, *mnist, *extra))
    vit_mnist = run.train(
        "mnist_vit_p16", f"{FMNIST}:fixed=16", 300, *mnist[:3], f"model.init='{vit16}'", *AT16, *FINE_TUNE_MNIST
    )
    cross += run.sweep("MNIST: ViT-p16, fine-tuned at p16", vit_mnist)

    # ---------------------------------------------------------------------------------- 3. Fig. 4: PI vs bilinear
    fig4 = scaled_resize_eval(vit8)

    # ---------------------------------------------------------------------------------- report
    # Reused runs count with the training time they took when they ran, so a resumed reproduction reports the total.
    evaluation = time.perf_counter() - started - run.trained_now
    minutes = (sum(run.timings.values()) + evaluation) / 60
    write_report(out, fig3, in_domain, cross, fig4, run.timings, minutes, args.seed)


def unseen_classes(run: Runner, consistency: list[str]) -> list[dict]:
    """The harder in-domain variant (``--unseen-classes``): pretrain on classes 0-4, a new head for classes 5-9."""
    old, new = f"data.classes={OLD}", [f"data.classes={NEW}", "model.new_head=True", *AT16]
    teacher = run.train("old_vit_p8", f"{FMNIST}:fixed=8", 800, old)
    distilled = run.train("old_flexivit_distilled", f"{DISTILL}:teacher={teacher}", 800, old)
    fixed16 = run.train("old_vit_p16", f"{FMNIST}:fixed=16", 800, old)
    rows = []
    for label, name, source, config, extra in [
        ("unseen classes: FlexiViT distilled, head at p16", "new_distilled_head", distilled, FMNIST, []),
        (
            "unseen classes: FlexiViT distilled, head at p16 + consistency",
            "new_distilled_head_cons",
            distilled,
            FMNIST,
            consistency,
        ),
        ("unseen classes: ViT-p16, head at p16", "new_vit_p16_head", fixed16, f"{FMNIST}:fixed=16", []),
    ]:
        workdir = run.train(name, config, 300, *new, f"model.init='{source}'", *HEAD_ONLY, *extra)
        rows += run.sweep(label, workdir)
    return rows


def write_report(out: Path, fig3, in_domain, cross, fig4, timings, minutes, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = ["model", "patch_size", "grid", "gflops", "accuracy"]
    plot_sweep(fig3, out / "reproduction_fig3.png", x_keys=("patch_size", "gflops"), title="Fig. 3 analogue")
    plot_sweep(
        in_domain,
        out / "reproduction_fig8.png",
        x_keys=("patch_size", "gflops"),
        title="Fig. 8 analogue, in-domain: transferred at p16 only, evaluated at every size",
    )
    plot_sweep(
        cross,
        out / "reproduction_fig8_cross.png",
        x_keys=("patch_size", "gflops"),
        title="Fig. 8 analogue, cross-domain (Fashion-MNIST -> MNIST-5k): fine-tuned at p16, evaluated at every size",
    )
    plot_sweep(fig4, out / "reproduction_fig4.png", x_keys=("scale",), title="Fig. 4 analogue")
    pivot = lambda rows: _pivot(rows)  # noqa: E731
    text = REPORT.format(
        fig3=pivot(fig3),
        in_domain=pivot(in_domain),
        cross=pivot(cross),
        fig4=markdown_table(
            fig4, columns=["model", "scale", "image_size", "patch_size", "accuracy"], percent=["accuracy"]
        ),
        timings="\n".join(f"| {k} | {v / 60:.1f} |" for k, v in timings.items()) or "| (all runs reused) | |",
        minutes=minutes,
        device=device_description(torch.device("cpu")),
        # The discussion quotes the seed-0 numbers; other seeds' reports are the tables alone.
        discussion=DISCUSSION.read_text() if DISCUSSION.exists() and seed == 0 else "",
        seed=seed,
        details=markdown_table(fig3 + in_domain + cross, columns=cols, percent=["accuracy"]),
    )
    (out / "reproduction.md").write_text(text)
    print(text)


def _pivot(rows: list[dict]) -> str:
    """Accuracy (%) with one row per model and one column per patch size."""
    sizes = list(dict.fromkeys(r["patch_size"] for r in rows))
    lines = ["| model | " + " | ".join(f"p{s}" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        acc = {r["patch_size"]: r["accuracy"] for r in rows if r["model"] == model}
        lines.append(f"| {model} | " + " | ".join(f"{100 * acc[s]:.1f}" if s in acc else "" for s in sizes) + " |")
    return "\n".join(lines)


REPORT = """# Small-scale reproduction

Measured by `python -m tools.reproduce` on {device}:
{minutes:.0f} minutes of training and evaluation summed over the runs of this report (the `--unseen-classes`
rows included where present). Seed {seed} for every run (`--seed`); differences of a point or two
are within noise. Models: width 128, depth 4, 2 heads
("flexivit_mu" at depth 4), 48 px Fashion-MNIST (real data, shipped offline), patch sizes 16, 12, 8, 6 and 4 (grids
3 to 12) plus 24 (grid 2, never trained) in evaluation. Accuracies in %, on the 10,000 Fashion-MNIST test images (the
5,000 of classes 5-9 for the unseen-classes rows) or the 1,000 MNIST-5k test digits.

## 1. Fig. 3 analogue: standard ViTs are not flexible, FlexiViT is

{fig3}

![fig3](reproduction_fig3.png)

## 2. Fig. 8 analogue: fast transfer, trained at the largest patch size and deployed at all

In-domain (as in the paper, ImageNet-21k -> ImageNet-1k): the section-1 backbones (pretrained on the first half of
the training images) get a new zero-initialised head trained at patch 16 on the other half (the same ten classes,
images never seen in pretraining): head only on the frozen backbone, or the whole model fine-tuned at p16.

{in_domain}

Cross-domain: the distilled FlexiViT (Fashion-MNIST) fine-tuned on MNIST-5k (4,000 training digits) with a new head.

{cross}

![fig8](reproduction_fig8.png)
![fig8 cross-domain](reproduction_fig8_cross.png)

## 3. Fig. 4 analogue: PI-resize when image and patch are scaled together

The ViT-p8 of section 1, evaluated with image and patch scaled by the same factor (the token grid stays 6x6); the
kernel resized with PI-resize or with plain bilinear interpolation.

{fig4}

![fig4](reproduction_fig4.png)

## Training time per run (minutes)

| run | minutes |
|---|---|
{timings}

{discussion}
## All rows

{details}
"""


if __name__ == "__main__":
    main()
