"""Speed of FlexiViT against timm's VisionTransformer of the same shape, per patch size (writes docs/benchmarks.md).

    python -m tools.benchmark                                   # Ti and S, the paper's patch sizes (~10 min, 2 cores)
    python -m tools.benchmark --models flexivit_tiny flexivit_small flexivit_base   # + B (~25 min more on 2 cores)
    python -m tools.benchmark --compile                         # + compiled flexible training (minutes per size)
    python -m tools.benchmark --quick --out /tmp/bench          # a tiny smoke run of every section (seconds)

A FlexiViT resizes its patch-embedding kernel and position embedding in every call; this tool shows what that
costs. For each model size and patch size it measures, in one process and on the same inputs:

- inference: our flexible model, the same model fixed to that patch size (``flexivit.fix_patch_size``, the
  deployment fast path) and timm's ``VisionTransformer`` of the same shape, called in turn (warm-up, then
  ``--repeats`` rounds, medians, ratios per pair); counted GFLOPs, achieved GFLOP/s and its fraction of the
  machine's measured matmul peak; the share of the forward spent resizing kernel and position embedding; memory.
- training steps (forward, loss, backward, SGD update): the flexible model at patch p right after a step at
  another patch size (as inside a flexible run), the fixed-p model (no resize at all) and timm.
- with ``--compile``: ``torch.compile`` of flexible training over changing patch sizes (graphs, step times).
- the input pipeline: images/s of the Fashion-MNIST training loader beside the model's training step.

CPU always (fp32, ``--batch-size``); a GPU when present (bf16 autocast, ``--gpu-batch-size``); ``--precision``
sets the autocast of both. ``--deployment`` measures instead fp32 against bf16 per patch size and ONNX Runtime
against eager PyTorch (docs/benchmarks_deployment.md). Both models compute
the same function: ours is built with the exact erf GELU that timm uses (``gelu_approximate="none"``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import flexivit
from flexivit.checkpoint import atomic_write
from flexivit.deploy import fix_patch_size, timm_kwargs
from flexivit.pi_resize import clear_caches
from tasks.common.deployment import PRECISIONS, autocast_dtype
from tasks.common.profiling import count_gflops_fn, device_description, measure_throughput
from tasks.common.reporting import markdown_table, plot_sweep, write_csv

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = REPO / "configs" / "classification" / "fashion_mnist.py"
SHORT = {"mu": "mu", "tiny": "Ti", "small": "S", "base": "B", "large": "L"}

# The smoke configuration of --quick: every section runs, on a model small enough for seconds on a CPU.
QUICK = dict(
    models=["flexivit_mu"],
    overrides=dict(width=32, depth=2, num_heads=2),
    patch_sizes=[16, 12, 8],
    image_size=48,
    batch_size=2,
    gpu_batch_size=2,
    repeats=2,
    warmup=1,
    compile_patch_sizes=[16, 8],
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["flexivit_tiny", "flexivit_small"], help="registry names")
    parser.add_argument("--patch-sizes", nargs="+", type=int, default=list(flexivit.PAPER_PATCH_SIZES))
    parser.add_argument("--batch-size", type=int, default=8, help="CPU batch size")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="GPU batch size (bf16 autocast)")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--skip-train", action="store_true", help="inference only")
    parser.add_argument("--skip-input", action="store_true", help="skip the input-pipeline section")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd flexible training")
    parser.add_argument("--compile-patch-sizes", nargs="+", type=int, default=[48, 24, 16])
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend ('eager' counts graphs in seconds)"
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--out", default="docs", help="folder for benchmarks.md / .csv / .png")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats: a smoke test")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), help="autocast on every device (default: fp32 on CPU, bf16 on GPU)"
    )
    parser.add_argument(
        "--deployment", action="store_true",
        help="only the deployment section: fp32 vs bf16 and ONNX Runtime vs eager per patch size",
    )  # fmt: skip
    parser.add_argument("--onnx-patch-sizes", nargs="+", type=int, default=[16, 8])
    parser.add_argument(
        "--index-cost", action="store_true", help="only the sampler's index cost per step at 13M items (seconds)"
    )
    args = parser.parse_args(argv)
    args.overrides = {}
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    return args


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, synchronised on a GPU (kernels run asynchronously)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _rotated(keys, r: int) -> list:
    """The contenders of repeat ``r``, first one rotated by ``r``: timed alternately, and each going first in turn,
    they all meet the same drifts of the machine (clock, other load)."""
    keys = list(keys)
    return keys[r % len(keys) :] + keys[: r % len(keys)]


# Autocast per device type: GPU runs use bf16, CPU runs plain fp32 (the targets are stated for fp32 on CPU);
# --precision sets both.
PRECISION = {"cpu": "fp32", "cuda": "bf16"}


def _autocast(device: torch.device):
    dtype = autocast_dtype(PRECISION[device.type], device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def matmul_peak_gflops(device: torch.device, quick: bool = False) -> float:
    """The best GEMM rate of this device in the dtype the benchmark runs in: fp32 on CPU, bf16 on GPU."""
    sizes = [256] if quick else ([2048, 3072] if device.type == "cpu" else [4096, 8192])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2 if quick else 5):
            best = max(best, 2 * n**3 / _timed_s(lambda a=a, b=b: a @ b, device) / 1e9)
    return best


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn`` adds at its peak, in MiB; None where it cannot be measured.

    GPU: ``torch.cuda.max_memory_allocated`` over the call, minus what was allocated before (tensors only).
    CPU (Linux): growth of the process's peak resident set during the call. The peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` after handing free heap memory back with ``malloc_trim``, so earlier calls do not
    hide this one; it counts everything the call touches (tensors, allocator slack, library workspaces).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS:")
        fn()
        return max(0, _status_bytes("VmHWM:") - base) / 2**20
    except (OSError, KeyError):
        return None  # not Linux, or /proc not writable


# ---------------------------------------------------------------------------------------------- models


def build_ours(name: str, overrides: dict, device: torch.device) -> flexivit.FlexiViT:
    # 1000 classes as in the comparisons of the paper; exact GELU so that both models compute the same function.
    model = flexivit.create_model(name, num_classes=1000, gelu_approximate="none", **overrides)
    return model.to(device)


def build_timm(ours: flexivit.FlexiViT, patch: int, image_size: int, device: torch.device):
    """timm's VisionTransformer with our model's shape at one patch size (class token without posemb, as ours)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**timm_kwargs(ours, patch, image_size))
    return model.to(device)


def short_name(name: str) -> str:
    variant = name.removeprefix("flexivit_")
    return SHORT.get(variant, variant)


# ---------------------------------------------------------------------------------------------- inference


def bench_inference(ours, name: str, args, device: torch.device, batch: int, peak: float) -> list[dict]:
    """One row per patch size: ours (flexible), ours fixed to p, and timm, called in turn on the same batch."""
    rows = []
    image = args.image_size
    x = torch.randn(batch, ours.kwargs["in_chans"], image, image, device=device)
    ours.eval()
    for patch in args.patch_sizes:
        grid = image // patch
        timm_model = build_timm(ours, patch, image, device).eval()
        fixed = fix_patch_size(ours, patch, image).eval()
        calls = {
            "ours": lambda x, p=patch: ours(x, patch_size=p),
            "fixed": fixed,
            "timm": timm_model,
        }
        gflops = count_gflops_fn(calls["ours"], x[:1])  # per image; the batch-independent resize is left out
        gflops_timm = count_gflops_fn(calls["timm"], x[:1])
        with _autocast(device):
            for call in calls.values():
                measure_throughput(call, x, warmup=args.warmup, repeats=1)
            times = {key: [] for key in calls}
            for r in range(args.repeats):
                for key in _rotated(calls, r):
                    times[key].append(measure_throughput(calls[key], x, warmup=0, repeats=1)["latency_ms"])
            with torch.inference_mode():
                memory = {key: peak_memory_mib(lambda c=calls[key]: c(x), device) for key in ("ours", "timm")}
        ms = {key: statistics.median(v) for key, v in times.items()}
        resize_ms = _embedding_overhead_ms(ours, fixed, x, patch, device, args.repeats)
        img_s = {key: batch * 1e3 / v for key, v in ms.items()}
        rows.append(
            {
                "model": short_name(name),
                "device": device.type,
                "patch_size": patch,
                "grid": grid,
                "gflops": gflops,
                "ours ms": ms["ours"],
                "fixed ms": ms["fixed"],
                "timm ms": ms["timm"],
                "ours img/s": img_s["ours"],
                "timm img/s": img_s["timm"],
                "ours/timm": ms["timm"] / ms["ours"],
                "fixed/timm": ms["timm"] / ms["fixed"],
                "ours GFLOP/s": gflops * img_s["ours"],
                "ours of peak": gflops * img_s["ours"] / peak,
                "timm of peak": gflops_timm * img_s["timm"] / peak,
                "resize share": resize_ms / ms["ours"],
                "ours MiB": memory["ours"],
                "timm MiB": memory["timm"],
                "fixed img/s": img_s["fixed"],
                "timm gflops": gflops_timm,
            }
        )
        print(
            f"[inference] {device.type} {short_name(name)}/{patch}: ours {ms['ours']:.1f} ms, fixed {ms['fixed']:.1f}"
            f", timm {ms['timm']:.1f} -> ours/timm {rows[-1]['ours/timm']:.3f}, "
            f"{100 * rows[-1]['ours of peak']:.0f}% of peak",
            flush=True,
        )
        del timm_model, fixed
    return rows


def _embedding_overhead_ms(ours, fixed, x: torch.Tensor, patch: int, device: torch.device, repeats: int) -> float:
    """What resizing costs per forward: the flexible model's patch and position embedding minus the fixed model's.

    Both embed the same batch, in turn, with the resize matrices cached; the difference is the time of the kernel
    resize (or, above the kernel's size, of resizing the patches instead: FlexiPatchEmbed) and of the
    position-embedding resize. Negative where the flexible embedding is the cheaper one.
    """
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    calls = {
        model: lambda m=model: (m.patch_embed(x, (patch, patch)), m.posemb_for_grid(grid)) for model in (ours, fixed)
    }
    times = {model: [] for model in calls}
    with torch.inference_mode(), _autocast(device):
        for call in calls.values():
            call()
        for _ in range(max(10, 4 * repeats)):
            for model, call in calls.items():
                times[model].append(_timed_s(call, device))
    return 1e3 * (statistics.median(times[ours]) - statistics.median(times[fixed]))


# ---------------------------------------------------------------------------------------------- training


def _train_step(model, optimizer, call, x, y, device) -> Callable[[], None]:
    def step() -> None:
        with _autocast(device):
            loss = F.cross_entropy(call(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(ours, name: str, args, device: torch.device, batch: int) -> list[dict]:
    """One row per patch size: a flexible step at p (after a step at another p), a fixed-p step, a timm step."""
    rows = []
    image = args.image_size
    x = torch.randn(batch, ours.kwargs["in_chans"], image, image, device=device)
    y = torch.randint(0, ours.num_classes, (batch,), device=device)
    ours.train()
    sgd = dict(lr=1e-4, momentum=0.9)  # a tiny rate: the weights barely move, so every step does the same work
    flex_opt = torch.optim.SGD(ours.parameters(), **sgd)
    # The cheapest other size: the step before each timed flexible step changes the patch size, as in a flexible
    # run, so a cost of switching (new resize matrices, reallocation, recompilation) would show in the timing.
    others = sorted(args.patch_sizes, reverse=True)
    for patch in args.patch_sizes:
        other = next(p for p in others if p != patch) if len(others) > 1 else patch
        fixed = fix_patch_size(ours, patch, image).train()
        timm_model = build_timm(ours, patch, image, device).train()
        steps = {
            "flex": _train_step(ours, flex_opt, lambda x, p=patch: ours(x, patch_size=p), x, y, device),
            "fixed": _train_step(fixed, torch.optim.SGD(fixed.parameters(), **sgd), fixed, x, y, device),
            "timm": _train_step(timm_model, torch.optim.SGD(timm_model.parameters(), **sgd), timm_model, x, y, device),
        }
        switch = _train_step(ours, flex_opt, lambda x, p=other: ours(x, patch_size=p), x, y, device)
        for step in steps.values():
            for _ in range(max(1, args.warmup)):
                step()
        times = {key: [] for key in steps}
        for r in range(args.repeats):
            for key in _rotated(steps, r):
                if key == "flex":
                    switch()
                times[key].append(1e3 * _timed_s(steps[key], device))
        memory = {key: peak_memory_mib(steps[key], device) for key in ("flex", "timm")}
        ms = {key: statistics.median(v) for key, v in times.items()}
        rows.append(
            {
                "model": short_name(name),
                "device": device.type,
                "patch_size": patch,
                "flex ms": ms["flex"],
                "fixed ms": ms["fixed"],
                "timm ms": ms["timm"],
                "flex/fixed cost": ms["flex"] / ms["fixed"],
                "ours/timm": ms["timm"] / ms["flex"],
                "flex img/s": batch * 1e3 / ms["flex"],
                "timm img/s": batch * 1e3 / ms["timm"],
                "flex MiB": memory["flex"],
                "timm MiB": memory["timm"],
            }
        )
        print(
            f"[train] {device.type} {short_name(name)}/{patch}: flex {ms['flex']:.1f} ms, fixed {ms['fixed']:.1f}, "
            f"timm {ms['timm']:.1f} -> flex/fixed {rows[-1]['flex/fixed cost']:.3f}",
            flush=True,
        )
        del steps, fixed, timm_model
    ours.eval()
    return rows


# ---------------------------------------------------------------------------------------------- torch.compile


def bench_compile(name: str, args, device: torch.device, batch: int) -> tuple[list[dict], dict]:
    """Compiled flexible training over a cycle of patch sizes: graphs compiled, compile time and step times."""
    from torch._dynamo.utils import counters

    sizes = args.compile_patch_sizes
    torch._dynamo.reset()
    counters.clear()
    clear_caches()  # cold resize caches, as at the start of a training run
    # As tools/train.py: static shapes, one graph per patch size, and a cache that holds them all.
    torch._dynamo.config.cache_size_limit = max(64, 4 * len(sizes))
    model = build_ours(name, args.overrides, device).train()
    compiled = torch.compile(model, dynamic=False, backend=args.compile_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, model.kwargs["in_chans"], args.image_size, args.image_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step(net, patch):
        return _train_step(model, optimizer, lambda x: net(x, patch_size=patch), x, y, device)

    first_s = {}
    for patch in sizes:  # the first step at each size compiles its graph
        first_s[patch] = _timed_s(step(compiled, patch), device)
        print(f"[compile] {device.type} {short_name(name)}/{patch}: first step {first_s[patch]:.1f} s", flush=True)
    graphs_first_pass = counters["stats"]["unique_graphs"]
    times = {(patch, key): [] for patch in sizes for key in ("eager", "compiled")}
    for _ in range(args.repeats):  # the sizes keep changing: every compiled step follows one at another size
        for patch in sizes:
            for key, net in (("compiled", compiled), ("eager", model)):
                times[patch, key].append(1e3 * _timed_s(step(net, patch), device))
    rows = []
    for patch in sizes:
        eager, comp = (statistics.median(times[patch, key]) for key in ("eager", "compiled"))
        rows.append(
            {
                "model": short_name(name),
                "device": device.type,
                "patch_size": patch,
                "first step s": first_s[patch],
                "eager ms": eager,
                "compiled ms": comp,
                "speed-up": eager / comp,
            }
        )
    summary = {
        "sizes": len(sizes),
        "graphs_first_pass": graphs_first_pass,
        "graphs_later": counters["stats"]["unique_graphs"] - graphs_first_pass,
        "graph_breaks": sum(counters["graph_break"].values()),
        "steps_later": args.repeats * len(sizes),
    }
    torch._dynamo.reset()
    return rows, summary


# ---------------------------------------------------------------------------------------------- input pipeline


def bench_input(args, device: torch.device) -> tuple[list[dict], str | None]:
    """Images/s of the Fashion-MNIST training loader and of the model's training step at that config."""
    from tasks import classification
    from tasks.common.config import load_config
    from tasks.common.loader import train_loader
    from tasks.common.optim import build_optimizer

    config = load_config(f"{FASHION_MNIST}:runlocal" if args.quick else str(FASHION_MNIST))
    try:
        train_set, train_tf, _, classes = classification.build_datasets(config.data)
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
        seconds = _timed_s(lambda it=it: [next(it) for _ in range(batches)], torch.device("cpu"))
        del it, loader
        note = " (the config's)" if workers == config.data.num_workers else ""
        rows.append({"what": f"loader, {workers} workers{note}", "img/s": batch * batches / seconds})

    model = classification.build_model(config.model, classes).to(device).train()
    optim = config.optim
    optimizer = build_optimizer(
        model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum,
        betas=optim.betas, lr_mults=optim.lr_mults,
    )  # fmt: skip
    data = (images.to(device), labels.to(device))
    sizes = config.patch_sizes.sizes

    def step(patch, s=0) -> None:
        with _autocast(device):
            loss, _ = classification.train_loss(model, data, patch, step=s, config=config)
        loss.backward()  # outside autocast, as the engine does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    per_size = []
    for patch in sizes:
        step(patch)
        per_size.append(statistics.median(_timed_s(lambda p=patch: step(p), device) for _ in range(args.repeats)))
    # The config samples the sizes uniformly: the mean step time is what a run pays per step.
    rows.append(
        {
            "what": f"training step on {device.type}, mean over patch sizes {sizes}",
            "img/s": batch / statistics.mean(per_size),
        }
    )
    loader_rate = next(r["img/s"] for r in rows if r["what"].endswith("(the config's)"))
    model_rate = rows[-1]["img/s"]
    bound = "the input pipeline" if loader_rate < model_rate else "the model"
    workers = config.data.num_workers
    together = (
        f"with {workers} loader workers loading and training take turns, about "
        f"{1 / (1 / loader_rate + 1 / model_rate):.0f} img/s together"
        if workers == 0
        else f"the {workers} loader workers run beside training, which goes at most at the slower of the two"
    )
    note = (
        f"Config {FASHION_MNIST.relative_to(REPO)}{':runlocal' if args.quick else ''} (model {config.model.name}, "
        f"{config.data.image_size} px, batch {batch}); {together}; {bound} bounds training."
    )
    return rows, note


def bench_index(num_items: int = 13_000_000, batch: int = 1024, steps: int = 50) -> list[dict]:
    """Cost of the training sampler's indices at ImageNet-21k scale: per step, and per epoch draw.

    ``StepBatches`` draws an epoch's permutation and item seeds once and then slices them (O(batch) per step); the
    row "drawn every step" times what it did before, the same draws repeated in every step.
    """
    import numpy as np

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

    def redraw_every_step(step: int) -> None:  # the previous implementation's work per step
        order = np.random.default_rng([0, 0]).permutation(num_items)
        seeds = np.random.default_rng([0, 0, 1]).integers(0, 2**62, size=num_items)
        [(int(i), int(seeds[i])) for i in order[step * batch : (step + 1) * batch]]

    redraw = statistics.median(_timed_s(lambda s=s: redraw_every_step(s), torch.device("cpu")) for s in range(3))
    return [
        {"what": f"per step, drawn once per epoch ({num_items:,} items, batch {batch})", "ms": 1e3 * per_step,
         "MiB held": held},
        {"what": "first step of an epoch (the epoch's draw)", "ms": 1e3 * first, "MiB held": held},
        {"what": "per step, drawn every step (before)", "ms": 1e3 * redraw, "MiB held": held},
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- report


def _cpu_rows(rows: list[dict], model: str) -> list[dict]:
    return [r for r in rows if r["device"] == "cpu" and r["model"] == model]


def targets(inference: list[dict], training: list[dict], compile_summary: dict | None, batch: int) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (on FlexiViT-S when measured)."""
    models = list(dict.fromkeys(r["model"] for r in inference))
    model = "S" if "S" in models else (models[0] if models else None)
    cpu = _cpu_rows(inference, model)
    out = []
    if cpu:
        worst = min(cpu, key=lambda r: r["ours/timm"])
        out.append(
            {
                "target": f"CPU forward throughput >= 1.00x timm at every patch size ({model}, batch {batch}, fp32)",
                "measured": f"min {worst['ours/timm']:.3f}x (patch {worst['patch_size']}); "
                f"max {max(r['ours/timm'] for r in cpu):.3f}x",
                "met": "yes" if worst["ours/timm"] >= 1.0 else "no",
            }
        )
    gpu = [r for r in inference if r["device"] == "cuda" and r["model"] == model]
    if gpu:
        worst = min(gpu, key=lambda r: r["ours/timm"])
        out.append(
            {
                "target": f"GPU forward throughput >= 1.00x timm at every patch size ({model}, bf16)",
                "measured": f"min {worst['ours/timm']:.3f}x (patch {worst['patch_size']})",
                "met": "yes" if worst["ours/timm"] >= 1.0 else "no",
            }
        )
    for device in dict.fromkeys(r["device"] for r in training):
        train = [r for r in training if r["model"] == model and r["device"] == device]
        if train:
            worst = max(train, key=lambda r: r["flex/fixed cost"])
            out.append(
                {
                    "target": f"flexible training step at p <= 1.03x a fixed-p step ({model}, {device})",
                    "measured": f"max {worst['flex/fixed cost']:.3f}x (patch {worst['patch_size']})",
                    "met": "yes" if worst["flex/fixed cost"] <= 1.03 else "no",
                }
            )
    big_grid = [r for r in cpu if r["grid"] >= 8]
    if big_grid:
        worst = max(big_grid, key=lambda r: r["resize share"])
        out.append(
            {
                "target": f"kernel + posemb resize < 1% of a forward at grid >= 8 ({model}, CPU)",
                "measured": f"max {100 * worst['resize share']:.2f}% (patch {worst['patch_size']})",
                "met": "yes" if worst["resize share"] < 0.01 else "no",
            }
        )
    fine = [r for r in cpu if r["grid"] >= 15]
    if fine:
        worst = min(fine, key=lambda r: r["ours of peak"])
        timm_range = [100 * r["timm of peak"] for r in fine]
        out.append(
            {
                "target": f"CPU forward >= 85% of the fp32 matmul peak at grid >= 15 ({model})",
                "measured": f"ours min {100 * worst['ours of peak']:.0f}% (patch {worst['patch_size']}); "
                f"timm {min(timm_range):.0f}-{max(timm_range):.0f}%",
                "met": "yes" if worst["ours of peak"] >= 0.85 else "no",
            }
        )
    if compile_summary:
        s = compile_summary
        ok = s["graphs_first_pass"] == s["sizes"] and s["graphs_later"] == 0
        out.append(
            {
                "target": "torch.compile: one graph per patch size, no recompilation when the size changes",
                "measured": f"{s['graphs_first_pass']} graphs for {s['sizes']} sizes; {s['graphs_later']} more in "
                f"{s['steps_later']} later steps; {s['graph_breaks']} graph breaks",
                "met": "yes" if ok else "no",
            }
        )
    return out


INFERENCE_COLUMNS = [
    "patch_size", "grid", "gflops", "ours ms", "fixed ms", "timm ms", "ours img/s", "ours/timm", "fixed/timm",
    "ours GFLOP/s", "ours of peak", "timm of peak", "resize share", "ours MiB", "timm MiB",
]  # fmt: skip
TRAIN_COLUMNS = [
    "patch_size", "flex ms", "fixed ms", "timm ms", "flex/fixed cost", "ours/timm", "flex img/s", "flex MiB",
    "timm MiB",
]  # fmt: skip
PERCENT = ["ours of peak", "timm of peak", "resize share"]


def write_report(results: dict, args, argv: list[str]) -> Path:
    out = Path(args.out)
    inference, training = results["inference"], results["training"]
    lines = [
        "# Benchmarks: FlexiViT vs timm's VisionTransformer",
        "",
        "Produced by `tools/benchmark.py`, which also wrote `benchmarks.csv` (every number), `benchmarks.png`"
        " (throughput) and `benchmarks_ratio.png` (throughput relative to timm).",
        "",
        f"- Command: `python -m tools.benchmark{' ' + shlex.join(argv) if argv else ''}`",
        f"- Date: {results['date']}; torch {torch.__version__}, timm {results['timm']}",
        *(f"- {device}: {desc}" for device, desc in results["machines"].items()),
        *(f"- Measured matmul peak on {d}: {p:.0f} GFLOP/s" for d, p in results["peaks"].items()),
        f"- Load average (1 min) at start / end: {results['load'][0]:.2f} / {results['load'][1]:.2f} "
        f"on {os.cpu_count()} CPUs: a load near or above the thread count means another job shared the machine "
        "and the timings are noisy.",
        f"- Batch {args.batch_size} on CPU ({PRECISION['cpu']}), {args.gpu_batch_size} on GPU "
        f"({PRECISION['cuda']} autocast); {args.image_size} px;"
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
    lines += ["## How to read this", "", METHOD]
    text = "\n".join(lines)
    path = out / "benchmarks.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))

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


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if values else ""


def summary_rows(inference: list[dict], training: list[dict]) -> list[dict]:
    """Per device and model: the ranges of the ratios over the patch sizes."""
    rows = []
    for device, model in dict.fromkeys((r["device"], r["model"]) for r in inference + training):
        inf = [r for r in inference if r["device"] == device and r["model"] == model]
        train = [r for r in training if r["device"] == device and r["model"] == model]
        rows.append(
            {
                "model": model,
                "device": device,
                "inference ours/timm": _span([r["ours/timm"] for r in inf]),
                "inference fixed/timm": _span([r["fixed/timm"] for r in inf]),
                "inference flexibility cost": _span([r["ours ms"] / r["fixed ms"] for r in inf]),
                "training ours/timm": _span([r["ours/timm"] for r in train]),
                "training flexibility cost": _span([r["flex/fixed cost"] for r in train]),
            }
        )
    return rows


METHOD = """\
- `ours` is the flexible model (32x32 kernel and 7x7 position embedding, both resized in every call); `fixed` is
  the same model after `flexivit.fix_patch_size(model, p, image_size)` (resized weights stored, no resize);
  `timm` is `timm.models.vision_transformer.VisionTransformer` of the same width, depth, heads and patch size.
  Ratios `a/b` are throughput ratios (b's time over a's): above 1 means faster than b.
- `gflops` per image are counted (`tasks.common.profiling`: matmuls, convolutions and attention, a multiply-add
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


# ---------------------------------------------------------------------------------------------- main


def bench_deployment(args, argv: list[str]) -> Path:
    """fp32 against bf16 autocast per patch size (the deployment model, :func:`fix_patch_size`) and ONNX Runtime
    against eager PyTorch at ``--onnx-patch-sizes``, on every device (ONNX: CPU only); docs/benchmarks_deployment.md."""
    from tasks.common.export import FixedSizeModel

    precision_rows, onnx_rows, machines = [], [], {}
    for device_name in args.devices:
        device = torch.device(device_name)
        machines[device.type] = device_description(device)
        batch = args.batch_size if device.type == "cpu" else args.gpu_batch_size
        for name in args.models:
            ours = build_ours(name, args.overrides, device).eval()
            torch.nn.init.normal_(ours.head.weight, std=0.02)  # not the zero init: the logits must differ to compare
            x = torch.randn(batch, ours.kwargs["in_chans"], args.image_size, args.image_size, device=device)
            for patch in args.patch_sizes:
                fixed = fix_patch_size(ours, patch, args.image_size).eval()

                def pooled(dtype, model=fixed, x=x, device=device):
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        return model.forward_features(x)["pooled"].float()

                calls = {"fp32": lambda f=pooled: f(None), "bf16": lambda f=pooled: f(torch.bfloat16)}
                with torch.inference_mode():
                    want, got = calls["fp32"](), calls["bf16"]()
                error = ((got - want).norm() / want.norm()).item()
                ms = _alternate(calls, device, args)
                precision_rows.append({
                    "model": short_name(name), "device": device.type, "patch_size": patch,
                    "grid": args.image_size // patch, "gflops": count_gflops_fn(fixed, x[:1]),
                    "fp32 ms": ms["fp32"], "bf16 ms": ms["bf16"],
                    "fp32 img/s": batch * 1e3 / ms["fp32"], "bf16 img/s": batch * 1e3 / ms["bf16"],
                    "bf16 speed-up": ms["fp32"] / ms["bf16"], "bf16 rel. error": error,
                })  # fmt: skip
                print(
                    f"[precision] {device.type} {short_name(name)}/{patch}: fp32 {ms['fp32']:.1f} ms, bf16 "
                    f"{ms['bf16']:.1f} ms (x{ms['fp32'] / ms['bf16']:.2f}), rel. error {error:.1e}",
                    flush=True,
                )
                if device.type == "cpu" and patch in args.onnx_patch_sizes:
                    exported = FixedSizeModel("classification", ours, patch, args.image_size)
                    onnx_rows.append(_bench_onnx(exported, x, name, patch, args))
                del fixed
            del ours
    text = _deployment_report(precision_rows, onnx_rows, machines, args, argv)
    path = Path(args.out) / "benchmarks_deployment.md"
    write_csv(precision_rows + onnx_rows, Path(args.out) / "benchmarks_deployment.csv")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(text, flush=True)
    return path


def _alternate(calls: dict, device: torch.device, args) -> dict:
    """Median ms per call, the calls taken in turn (rotated) after a warm-up, as in :func:`bench_inference`."""
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(args.warmup):
                call()
        times = {key: [] for key in calls}
        for r in range(args.repeats):
            for key in _rotated(calls, r):
                times[key].append(1e3 * _timed_s(calls[key], device))
    return {key: statistics.median(v) for key, v in times.items()}


def _bench_onnx(model, x: torch.Tensor, name: str, patch: int, args) -> dict:
    import tempfile

    import onnxruntime

    from tasks.common.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, x[:2])
        options = onnxruntime.SessionOptions()
        # ORT's threads spin-wait between calls by default, which would slow the eager calls taking turns with it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    with torch.inference_mode():
        diff = (torch.from_numpy(session.run(None, feed)[0]) - model(x)).abs().max().item()
    ms = _alternate({"eager": lambda: model(x), "onnxruntime": lambda: session.run(None, feed)}, x.device, args)
    batch = x.shape[0]
    return {
        "model": short_name(name), "device": "cpu", "patch_size": patch, "grid": args.image_size // patch,
        "eager ms": ms["eager"], "onnxruntime ms": ms["onnxruntime"],
        "eager img/s": batch * 1e3 / ms["eager"], "onnxruntime img/s": batch * 1e3 / ms["onnxruntime"],
        "onnxruntime/eager": ms["eager"] / ms["onnxruntime"], "max abs diff": diff,
    }  # fmt: skip


def _deployment_report(precision_rows, onnx_rows, machines, args, argv) -> str:
    import onnxruntime

    lines = [
        "# Deployment speed: bf16 against fp32, ONNX Runtime against eager PyTorch",
        "",
        *(f"- {kind}: {text}" for kind, text in machines.items()),
        f"- {args.image_size} px, batch {args.batch_size} on CPU ({args.gpu_batch_size} on GPU); the model fixed to "
        "each patch size (`flexivit.fix_patch_size`), 1000-class shape, exact GELU; median of "
        f"{args.repeats} rounds, the variants called in turn; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
        "- bf16: `torch.autocast` (matmuls in bf16, the residual stream in fp32); rel. error: ||bf16 - fp32|| / "
        "||fp32|| of the pooled features",
        "",
        "## bf16 against fp32",
        "",
        markdown_table(precision_rows, percent=[]),
        "",
    ]
    if onnx_rows:
        lines += ["## ONNX Runtime against eager PyTorch (fp32, CPU)", "", markdown_table(onnx_rows), ""]
    lines += [f"Command: `python -m tools.benchmark {shlex.join(argv)}`", ""]
    return "\n".join(lines)


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision:
        PRECISION.update(cpu=args.precision, cuda=args.precision)
    if args.deployment:
        return bench_deployment(args, argv)
    if args.index_cost:
        rows = bench_index(steps=5 if args.quick else 50, num_items=100_000 if args.quick else 13_000_000)
        text = "# Training sampler: index cost per step\n\n" + markdown_table(rows)
        path = Path(args.out) / "benchmarks_index.md"
        atomic_write(
            path,
            lambda tmp: Path(tmp).write_text(text + f"\nCommand: `python -m tools.benchmark {shlex.join(argv)}`\n"),
        )
        print(text, flush=True)
        return path
    torch.manual_seed(0)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "timm": timm.__version__,
        "machines": {},
        "peaks": {},
        "inference": [],
        "training": [],
        "compile": [],
        "input": [],
        "input_note": None,
        "load": [os.getloadavg()[0]],
    }
    compile_summary = None
    for device_name in args.devices:
        device = torch.device(device_name)
        batch = args.batch_size if device.type == "cpu" else args.gpu_batch_size
        results["machines"][device.type] = device_description(device)
        peak = matmul_peak_gflops(device, args.quick)
        results["peaks"][device.type] = peak
        print(f"[peak] {device_description(device)}: {peak:.0f} GFLOP/s", flush=True)
        for name in args.models:
            ours = build_ours(name, args.overrides, device)
            results["inference"] += bench_inference(ours, name, args, device, batch, peak)
            if not args.skip_train:
                results["training"] += bench_training(ours, name, args, device, batch)
            del ours
        if args.compile:
            name = "flexivit_small" if "flexivit_small" in args.models else args.models[0]
            rows, summary = bench_compile(name, args, device, batch)
            results["compile"] += rows
            compile_summary = compile_summary or summary
    if not args.skip_input:
        device = torch.device(args.devices[-1])
        results["input"], results["input_note"] = bench_input(args, device)
    results["load"].append(os.getloadavg()[0])
    results["targets"] = targets(results["inference"], results["training"], compile_summary, args.batch_size)
    path = write_report(results, args, argv)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
