"""The input pipeline beside the model: images/s of the Fashion-MNIST training loader and of the training step.

    python -m tools.benchmarks.input_pipeline            # configs/classification/fashion_mnist.py, the main job
    python -m tools.benchmarks.input_pipeline --quick    # its runlocal preset

The loader is timed with the config's number of workers and with 2 (one per core here), the training step (the
task's loss through the contract, the config's optimizer) at each of the config's patch sizes; the note says which
of the two bounds training. Skipped, with a note, when the Fashion-MNIST data is missing. ``python -m
tools.benchmarks`` writes these rows into docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys

import torch

from tasks import get_task
from tools.benchmarks import common
from tools.lib.reporting import markdown_table

CONFIG = common.REPO / "configs" / "classification" / "fashion_mnist.py"


def bench_input(args, device: torch.device) -> tuple[list[dict], str]:
    """Rows of images/s (loader per worker count, training step) and a note saying which bounds training."""
    from tasks.common.config import load_config
    from tasks.common.loader import train_loader
    from tasks.common.optim import build_optimizer

    config = load_config(f"{CONFIG}:runlocal" if args.quick else str(CONFIG))
    task = get_task(config.task)
    try:
        train_set, train_tf, _, info = task.build_datasets(config.data)
    except (FileNotFoundError, OSError) as e:
        return [], f"input pipeline skipped: the Fashion-MNIST data is missing ({e})"
    batch, batches = config.train.batch_size, 2 if args.quick else 20
    rows = []
    # The config's number of workers, and 2 (one per core here) for comparison; the smoke run only the first.
    for workers in [config.data.num_workers] if args.quick else sorted({config.data.num_workers, 2}):
        loader = train_loader(
            train_set, train_tf, global_batch=batch, seed=config.seed, rank=0, world=1, start_step=0,
            num_workers=workers,
        )  # fmt: skip
        it = iter(loader)
        images, labels = next(it)  # starts the workers; not timed
        seconds = common.timed_s(lambda it=it: [next(it) for _ in range(batches)], torch.device("cpu"))
        del it, loader
        note = " (the config's)" if workers == config.data.num_workers else ""
        rows.append({"what": f"loader, {workers} workers{note}", "img/s": batch * batches / seconds})

    model = task.build_model(config.model, info).to(device).train()
    loss_fn = task.make_loss(config, info)
    optim = config.optim
    optimizer = build_optimizer(
        model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum,
        betas=optim.betas, lr_mults=optim.lr_mults,
    )  # fmt: skip
    data = (images.to(device), labels.to(device))
    sizes = config.patch_sizes.sizes

    def step(patch) -> None:
        with common.device_autocast(args, device):
            loss, _ = loss_fn(model, data, patch, 0)
        loss.backward()  # outside autocast, as the engine does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    per_size = []
    for patch in sizes:
        step(patch)
        times = [common.timed_s(lambda p=patch: step(p), device) for _ in range(args.repeats)]
        per_size.append(statistics.median(times))
    # The config samples the sizes uniformly: the mean step time is what a run pays per step.
    model_rate = batch / statistics.mean(per_size)
    rows.append({"what": f"training step on {device.type}, mean over patch sizes {sizes}", "img/s": model_rate})
    loader_rate = next(r["img/s"] for r in rows if r["what"].endswith("(the config's)"))
    bound = "the input pipeline" if loader_rate < model_rate else "the model"
    workers = config.data.num_workers
    together = (
        f"with {workers} loader workers loading and training take turns, about "
        f"{1 / (1 / loader_rate + 1 / model_rate):.0f} img/s together"
        if workers == 0
        else f"the {workers} loader workers run beside training, which goes at most at the slower of the two"
    )
    note = (
        f"Config {CONFIG.relative_to(common.REPO)}{':runlocal' if args.quick else ''} (model {config.model.name}, "
        f"{config.data.image_size} px, batch {batch}); {together}; {bound} bounds training."
    )
    return rows, note


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse(common.parser(__doc__, models=False), argv)
    rows, note = bench_input(args, torch.device(args.devices[-1]))
    if rows:
        print(markdown_table(rows))
    print(note)
    return rows, note


if __name__ == "__main__":
    main()
