"""The training sampler's index cost at ImageNet-21k scale: per step, per epoch draw, and the memory it holds.

    python -m tools.benchmarks.sampler                 # 13M items, batch 1024 (docs/benchmarks_index.md, seconds)
    python -m tools.benchmarks.sampler --quick --out /tmp/bench

``tasks.common.loader.StepBatches`` draws an epoch's permutation and the items' augmentation seeds once, at the
epoch's first step, and then slices them, so a step costs O(batch) and the sampler holds two int64 arrays of the
dataset's length. This measures both: the mean time of a step within an epoch, the time of the epoch's first step
(the draw) and the MiB held, written as a table to ``--out``/benchmarks_index.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.benchmarks import common
from tools.lib.reporting import markdown_table


def bench_index(num_items: int = 13_000_000, batch: int = 1024, steps: int = 50) -> list[dict]:
    """Rows: the mean ms of a step within an epoch, and of the epoch's first step; the MiB the sampler holds."""
    from tasks.common.loader import StepBatches

    sampler = StepBatches(num_items, batch, seed=0)
    start = time.perf_counter()
    sampler.batch_for_step(0)  # draws epoch 0
    first = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, steps + 1):
        sampler.batch_for_step(step)
    per_step = (time.perf_counter() - start) / steps
    held = (sampler._order.nbytes + sampler._item_seeds.nbytes) / 2**20
    return [
        {"what": f"per step, drawn once per epoch ({num_items:,} items, batch {batch})", "ms": 1e3 * per_step,
         "MiB held": held},
        {"what": "first step of an epoch (the epoch's draw)", "ms": 1e3 * first, "MiB held": held},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=13_000_000, help="dataset size (ImageNet-21k: ~13M)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--steps", type=int, default=50, help="steps timed after the epoch's draw")
    parser.add_argument("--out", default="docs", help="folder of benchmarks_index.md")
    parser.add_argument("--quick", action="store_true", help="100k items and 5 steps: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.steps = 100_000, 5
    rows = bench_index(args.items, args.batch, args.steps)
    text = "# Training sampler: index cost per step\n\n" + markdown_table(rows)
    print(text, flush=True)
    return common.write_text(
        Path(args.out) / "benchmarks_index.md",
        text + f"\nCommand: `{common.command('tools.benchmarks.sampler', argv)}`\n",
    )


if __name__ == "__main__":
    main()
