"""torch.compile of flexible training over changing patch sizes: graphs compiled, compile time, step times.

    python -m tools.benchmarks.compiled --models flexivit_small               # inductor, minutes per size
    python -m tools.benchmarks.compiled --quick --compile-backend eager       # counts graphs in seconds

The model is compiled as tools/train.py compiles it (static shapes, a cache that holds one graph per patch size);
the first step at each size compiles its graph, then the sizes keep cycling, so every timed compiled step follows
one at another size, beside the same step in eager mode. The summary counts the graphs of the first pass, those
compiled later (0 means no recompilation when the size changes) and the graph breaks. ``python -m tools.benchmarks
--compile`` writes these rows into docs/benchmarks.md with the target they are held to.
"""

from __future__ import annotations

import statistics
import sys

import torch

from flexivit.pi_resize import clear_caches
from tools.benchmarks import common
from tools.benchmarks.speed import train_step
from tools.lib.reporting import markdown_table


def bench_compile(name: str, args, device: torch.device) -> tuple[list[dict], dict]:
    """Rows per patch size (first step s, eager / compiled ms) and the graph counts of compiled flexible training."""
    from torch._dynamo.utils import counters

    sizes, batch = args.compile_patch_sizes, common.batch_size(args, device)
    torch._dynamo.reset()
    counters.clear()
    clear_caches()  # cold resize caches, as at the start of a training run
    torch._dynamo.config.cache_size_limit = max(64, 4 * len(sizes))
    model = common.build_ours(name, args.overrides, device).train()
    compiled = torch.compile(model, dynamic=False, backend=args.compile_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, model.kwargs["in_chans"], args.image_size, args.image_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step(net, patch):
        return train_step(model, optimizer, lambda x: net(x, patch_size=patch), x, y, args, device)

    first_s = {}
    for patch in sizes:  # the first step at each size compiles its graph
        first_s[patch] = common.timed_s(step(compiled, patch), device)
        print(f"[compile] {device.type} {common.short_name(name)}/{patch}: first step {first_s[patch]:.1f} s")
    graphs_first_pass = counters["stats"]["unique_graphs"]
    times = {(patch, key): [] for patch in sizes for key in ("eager", "compiled")}
    for _ in range(args.repeats):  # the sizes keep changing: every compiled step follows one at another size
        for patch in sizes:
            for key, net in (("compiled", compiled), ("eager", model)):
                times[patch, key].append(1e3 * common.timed_s(step(net, patch), device))
    rows = []
    for patch in sizes:
        eager, comp = (statistics.median(times[patch, key]) for key in ("eager", "compiled"))
        rows.append({
            "model": common.short_name(name), "device": device.type, "patch_size": patch,
            "first step s": first_s[patch], "eager ms": eager, "compiled ms": comp, "speed-up": eager / comp,
        })  # fmt: skip
    summary = {
        "sizes": len(sizes),
        "graphs_first_pass": graphs_first_pass,
        "graphs_later": counters["stats"]["unique_graphs"] - graphs_first_pass,
        "graph_breaks": sum(counters["graph_break"].values()),
        "steps_later": args.repeats * len(sizes),
    }
    torch._dynamo.reset()
    return rows, summary


def model_name(models: list[str]) -> str:
    """The model compiled: FlexiViT-S when asked for (the targets are stated for it), else the first."""
    return "flexivit_small" if "flexivit_small" in models else models[0]


def add_arguments(parser) -> None:
    parser.add_argument("--compile-patch-sizes", nargs="+", type=int, default=[48, 24, 16])
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend ('eager' counts graphs in seconds)"
    )


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.parser(__doc__)
    add_arguments(parser)
    args = common.parse(parser, argv)
    rows, summary = [], None
    for device_name in args.devices:
        device_rows, device_summary = bench_compile(model_name(args.models), args, torch.device(device_name))
        rows += device_rows
        summary = summary or device_summary
    print(markdown_table(rows))
    print(summary)
    return rows, summary


if __name__ == "__main__":
    main()
