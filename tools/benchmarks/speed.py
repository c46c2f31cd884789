"""Speed of FlexiViT against timm's VisionTransformer of the same shape, per patch size: inference and training.

    python -m tools.benchmarks.speed --models flexivit_small --patch-sizes 16 8     # prints the tables
    python -m tools.benchmarks.speed --quick

For each model and patch size, in one process and on the same inputs, our flexible model (kernel and position
embedding resized in every call), the same model fixed to that patch size (``flexivit.fix_patch_size``, the
deployment path) and timm's ``VisionTransformer`` of the same shape take turns (warm-up, then ``--repeats`` rounds,
medians). Inference rows: counted GFLOPs, achieved GFLOP/s and its fraction of the measured matmul peak, the share
of the forward spent resizing, memory. Training rows (forward, loss, backward, SGD update): the flexible model at p
right after a step at another size (as in a flexible run), the fixed-p model (no resize) and timm. Both models
compute the same function (ours with timm's exact erf GELU). ``python -m tools.benchmarks`` writes these rows into
docs/benchmarks.md with the targets they are held to.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexivit.deploy import fix_patch_size
from tools.benchmarks import common
from tools.lib.profiling import count_gflops_fn
from tools.lib.reporting import markdown_table


def bench_inference(ours, name: str, args, device: torch.device, peak: float) -> list[dict]:
    """One row per patch size: ours (flexible), ours fixed to p, and timm, called in turn on the same batch."""
    rows = []
    image, batch = args.image_size, common.batch_size(args, device)
    x = torch.randn(batch, ours.kwargs["in_chans"], image, image, device=device)
    ours.eval()
    for patch in args.patch_sizes:
        timm_model = common.build_timm(ours, patch, image, device).eval()
        fixed = fix_patch_size(ours, patch, image).eval()
        models = {"ours": lambda x, p=patch: ours(x, patch_size=p), "fixed": fixed, "timm": timm_model}
        gflops = count_gflops_fn(models["ours"], x[:1])  # per image; the batch-independent resize is left out
        gflops_timm = count_gflops_fn(models["timm"], x[:1])
        calls = {key: lambda m=m: m(x) for key, m in models.items()}
        with torch.inference_mode(), common.device_autocast(args, device):
            ms = common.alternate_ms(calls, device, args.warmup, args.repeats)
            memory = {key: common.peak_memory_mib(calls[key], device) for key in ("ours", "timm")}
        resize_ms = embedding_overhead_ms(ours, fixed, x, patch, device, args)
        img_s = {key: batch * 1e3 / v for key, v in ms.items()}
        rows.append({
            "model": common.short_name(name), "device": device.type, "patch_size": patch, "grid": image // patch,
            "gflops": gflops, "ours ms": ms["ours"], "fixed ms": ms["fixed"], "timm ms": ms["timm"],
            "ours img/s": img_s["ours"], "timm img/s": img_s["timm"],
            "ours/timm": ms["timm"] / ms["ours"], "fixed/timm": ms["timm"] / ms["fixed"],
            "ours GFLOP/s": gflops * img_s["ours"], "ours of peak": gflops * img_s["ours"] / peak,
            "timm of peak": gflops_timm * img_s["timm"] / peak, "resize share": resize_ms / ms["ours"],
            "ours MiB": memory["ours"], "timm MiB": memory["timm"], "fixed img/s": img_s["fixed"],
            "timm gflops": gflops_timm,
        })  # fmt: skip
        print(
            f"[inference] {device.type} {common.short_name(name)}/{patch}: ours {ms['ours']:.1f} ms, fixed "
            f"{ms['fixed']:.1f}, timm {ms['timm']:.1f} -> ours/timm {rows[-1]['ours/timm']:.3f}, "
            f"{100 * rows[-1]['ours of peak']:.0f}% of peak",
            flush=True,
        )
        del timm_model, fixed
    return rows


def embedding_overhead_ms(ours, fixed, x: torch.Tensor, patch: int, device: torch.device, args) -> float:
    """What resizing costs per forward: the flexible model's patch and position embedding minus the fixed model's.

    Both embed the same batch, in turn, with the resize matrices cached; the difference is the time of the kernel
    resize (or, above the kernel's size, of resizing the patches instead: FlexiPatchEmbed) and of the
    position-embedding resize. Negative where the flexible embedding is the cheaper one.
    """
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    calls = {
        key: lambda m=model: (m.patch_embed(x, (patch, patch)), m.posemb_for_grid(grid))
        for key, model in (("ours", ours), ("fixed", fixed))
    }
    with torch.inference_mode(), common.device_autocast(args, device):
        ms = common.alternate_ms(calls, device, warmup=1, repeats=max(10, 4 * args.repeats))
    return ms["ours"] - ms["fixed"]


def train_step(model, optimizer, call, x, y, args, device) -> Callable[[], None]:
    """One training step of ``call`` (forward, cross-entropy, backward, update); the backward outside autocast."""

    def step() -> None:
        with common.device_autocast(args, device):
            loss = F.cross_entropy(call(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(ours, name: str, args, device: torch.device) -> list[dict]:
    """One row per patch size: a flexible step at p (after a step at another p), a fixed-p step, a timm step."""
    rows = []
    image, batch = args.image_size, common.batch_size(args, device)
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
        timm_model = common.build_timm(ours, patch, image, device).train()
        steps = {
            "flex": train_step(ours, flex_opt, lambda x, p=patch: ours(x, patch_size=p), x, y, args, device),
            "fixed": train_step(fixed, torch.optim.SGD(fixed.parameters(), **sgd), fixed, x, y, args, device),
            "timm": train_step(
                timm_model, torch.optim.SGD(timm_model.parameters(), **sgd), timm_model, x, y, args, device
            ),
        }
        switch = train_step(ours, flex_opt, lambda x, p=other: ours(x, patch_size=p), x, y, args, device)
        before = {"flex": switch, "fixed": lambda: None, "timm": lambda: None}  # only the flexible step switches
        ms = common.alternate_ms(steps, device, max(1, args.warmup), args.repeats, before=before)
        memory = {key: common.peak_memory_mib(steps[key], device) for key in ("flex", "timm")}
        rows.append({
            "model": common.short_name(name), "device": device.type, "patch_size": patch,
            "flex ms": ms["flex"], "fixed ms": ms["fixed"], "timm ms": ms["timm"],
            "flex/fixed cost": ms["flex"] / ms["fixed"], "ours/timm": ms["timm"] / ms["flex"],
            "flex img/s": batch * 1e3 / ms["flex"], "timm img/s": batch * 1e3 / ms["timm"],
            "flex MiB": memory["flex"], "timm MiB": memory["timm"],
        })  # fmt: skip
        print(
            f"[train] {device.type} {common.short_name(name)}/{patch}: flex {ms['flex']:.1f} ms, fixed "
            f"{ms['fixed']:.1f}, timm {ms['timm']:.1f} -> flex/fixed {rows[-1]['flex/fixed cost']:.3f}",
            flush=True,
        )
        del steps, fixed, timm_model
    ours.eval()
    return rows


INFERENCE_COLUMNS = [
    "patch_size", "grid", "gflops", "ours ms", "fixed ms", "timm ms", "ours img/s", "ours/timm", "fixed/timm",
    "ours GFLOP/s", "ours of peak", "timm of peak", "resize share", "ours MiB", "timm MiB",
]  # fmt: skip
TRAIN_COLUMNS = [
    "patch_size", "flex ms", "fixed ms", "timm ms", "flex/fixed cost", "ours/timm", "flex img/s", "flex MiB",
    "timm MiB",
]  # fmt: skip
PERCENT = ["ours of peak", "timm of peak", "resize share"]


def run(args) -> dict:
    """Every device and model of ``args``: ``{"machines", "peaks", "inference", "training"}``."""
    from tools.lib.profiling import device_description

    results = {"machines": {}, "peaks": {}, "inference": [], "training": []}
    for device_name in args.devices:
        device = torch.device(device_name)
        results["machines"][device.type] = device_description(device)
        peak = results["peaks"][device.type] = common.matmul_peak_gflops(device, args.quick)
        print(f"[peak] {results['machines'][device.type]}: {peak:.0f} GFLOP/s", flush=True)
        for name in args.models:
            ours = common.build_ours(name, args.overrides, device)
            results["inference"] += bench_inference(ours, name, args, device, peak)
            if not args.skip_train:
                results["training"] += bench_training(ours, name, args, device)
            del ours
    return results


def add_arguments(parser) -> None:
    parser.add_argument("--skip-train", action="store_true", help="inference only")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.parser(__doc__)
    add_arguments(parser)
    args = common.parse(parser, argv)
    torch.manual_seed(0)
    results = run(args)
    print(markdown_table(results["inference"], ["model", "device", *INFERENCE_COLUMNS], percent=PERCENT))
    if results["training"]:
        print(markdown_table(results["training"], ["model", "device", *TRAIN_COLUMNS]))
    return results


if __name__ == "__main__":
    main()
