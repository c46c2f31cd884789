"""What every benchmark shares: its command-line options, alternating timings, peak memory, the two models.

Timings are medians of contenders called in turn (:func:`rotated`), each going first in turn, so that the drifts of
a shared machine (clock, other load) hit them all alike. CPU runs fp32 and a GPU bf16 autocast unless
``--precision`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import flexivit
from flexivit.deploy import timm_kwargs
from flexivit.files import atomic_write_text
from tasks.common.precision import PRECISIONS, autocast, autocast_dtype

REPO = Path(__file__).resolve().parents[2]
SHORT = {"mu": "mu", "tiny": "Ti", "small": "S", "base": "B", "large": "L"}
# The precision of each device type when --precision is not given: the CPU targets are stated for fp32.
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "bf16"}

# --quick: every benchmark runs, on a model small enough for seconds on a CPU (the defaults of the options a command
# has, and the model's shape).
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


def parser(doc: str, models: bool = True, precision: bool = True) -> argparse.ArgumentParser:
    """The options of the benchmarks (``models``: those of a benchmark of model sizes and patch sizes,
    ``precision``: --precision); a command adds its own before :func:`parse`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if models:
        p.add_argument("--models", nargs="+", default=["flexivit_tiny", "flexivit_small"], help="registry names")
        p.add_argument("--patch-sizes", nargs="+", type=int, default=list(flexivit.PAPER_PATCH_SIZES))
        p.add_argument("--batch-size", type=int, default=8, help="CPU batch size")
        p.add_argument("--gpu-batch-size", type=int, default=64, help="GPU batch size")
        p.add_argument("--image-size", type=int, default=240)
        p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (medians are reported)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    if precision:
        p.add_argument(
            "--precision", choices=list(PRECISIONS), help="autocast everywhere (default: CPU fp32, GPU bf16)"
        )
    p.add_argument("--quick", action="store_true", help="a tiny model and few repeats: a smoke test")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (with --quick, :data:`QUICK` replaces the defaults: options given still win), set the CPU
    threads and fill the devices."""
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**{key: value for key, value in QUICK.items() if hasattr(args, key)})
        args = p.parse_args(argv)
    args.overrides = QUICK["overrides"] if args.quick else {}
    args.devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def batch_size(args, device: torch.device) -> int:
    return args.batch_size if device.type == "cpu" else args.gpu_batch_size


def device_precision(args, device: torch.device) -> str:
    return getattr(args, "precision", None) or DEFAULT_PRECISION[device.type]


def device_autocast(args, device: torch.device):
    """The autocast context of ``device`` (nothing for fp32)."""
    return autocast(device, autocast_dtype(device_precision(args, device), device))


def command(module: str, argv: list[str]) -> str:
    """The command line that reproduces a report, as written into it."""
    return f"python -m {module}{' ' + shlex.join(argv) if argv else ''}"


def write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, synchronised on a GPU (kernels run asynchronously)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def rotated(keys, r: int) -> list:
    """The contenders of repeat ``r``, the first one rotated by ``r``."""
    keys = list(keys)
    return keys[r % len(keys) :] + keys[: r % len(keys)]


def alternate_ms(calls: dict, device: torch.device, warmup: int, repeats: int, before=None) -> dict:
    """Median ms per call of ``calls`` (name -> fn), taken in turn after ``warmup`` untimed calls each.

    ``before[name]()``, if given, runs untimed before each timed call (e.g. a training step at another patch size).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {key: [] for key in calls}
    for r in range(repeats):
        for key in rotated(calls, r):
            if before is not None:
                before[key]()
            times[key].append(1e3 * timed_s(calls[key], device))
    return {key: statistics.median(v) for key, v in times.items()}


def matmul_peak_gflops(device: torch.device, quick: bool = False) -> float:
    """The best GEMM rate of this device in the dtype the benchmarks run in: fp32 on CPU, bf16 on GPU."""
    sizes = [256] if quick else ([2048, 3072] if device.type == "cpu" else [4096, 8192])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2 if quick else 5):
            best = max(best, 2 * n**3 / timed_s(lambda a=a, b=b: a @ b, device) / 1e9)
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
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
    # 1000 classes as in the comparisons of the paper; exact GELU so that ours and timm compute the same function.
    model = flexivit.create_model(name, num_classes=1000, gelu_approximate="none", **overrides)
    return model.to(device)


def build_timm(ours: flexivit.FlexiViT, patch: int, image_size: int, device: torch.device):
    """timm's VisionTransformer with our model's shape at one patch size (class token without posemb, as ours)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**timm_kwargs(ours, patch, image_size)).to(device)


def short_name(name: str) -> str:
    variant = name.removeprefix("flexivit_")
    return SHORT.get(variant, variant)
