"""Measuring a model at one patch size: forward GFLOPs per image, throughput, and the device it ran on.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add as 2 FLOPs
and only counts matmuls, convolutions and attention (no norms, activations, softmax or bias adds); that is the
usual convention of the ViT papers' GFLOPs columns.

Two choices worth knowing:

- On CPU, ``F.scaled_dot_product_attention`` runs as ``aten._scaled_dot_product_flash_attention_for_cpu``,
  which FlopCounterMode has no formula for (checked on torch 2.14: it counts 0 FLOPs). We register one
  (``2*B*H*Tq*Tk*(Dqk + Dv)``, the same as torch's formula for the CUDA kernels), so attention is counted on
  every device.
- FlexiViT resizes its patch-embedding kernel and position embedding in every forward pass. That work does
  not depend on the batch size (and could be cached at inference), so it is not a per-image cost: counting a
  batch of 1 alone would charge all of it to one image (~20% of a mu model at 48 px, ~25% of B/48 at 240 px).
  We count a batch of 1 and a batch of 2 and split the total into ``per_image = F(2) - F(1)`` and
  ``per_call = F(1) - per_image``; :func:`split_gflops` returns both.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import flexivit

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Two batched matmuls: scores = q @ k^T and out = softmax(scores) @ v; heads of q (GQA broadcasts k, v).
    b, h, tq, d_qk = query_shape
    tk, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * d_qk + 2 * b * h * tq * tk * d_v


# Ops that FlopCounterMode leaves uncounted; getattr keeps this importable on torch builds without them.
_EXTRA_FORMULAS = {
    op: _sdpa_flops for op in (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),) if op is not None
}


def _count_flops(fn: Callable[[Any], Any], x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(x)
    return counter.get_total_flops()


def split_gflops(fn: Callable[[torch.Tensor], Any], example_input: torch.Tensor) -> tuple[float, float]:
    """``(per_image, per_call)`` forward GFLOPs of ``fn(x)``, with 1 GFLOP = 1e9 FLOPs and a multiply-add = 2.

    ``example_input`` is a batch (batch dimension first); only its first item is used. ``per_image`` grows with
    the batch, ``per_call`` is the batch-independent rest (e.g. FlexiViT's kernel and position-embedding
    resize). Both come from counts at batch 1 and 2, after one uncounted warm-up call so that one-time work
    (filling caches) is not counted.
    """
    one = example_input[:1]
    two = torch.cat([one, one])
    with torch.no_grad():
        fn(one)
    flops_1 = _count_flops(fn, one)
    flops_2 = _count_flops(fn, two)
    per_image = flops_2 - flops_1
    return per_image / 1e9, (flops_1 - per_image) / 1e9


def count_gflops_fn(fn: Callable[[torch.Tensor], Any], example_input: torch.Tensor) -> float:
    """Forward GFLOPs per image of any callable ``fn(x)`` (e.g. a timm model); see :func:`split_gflops`.

    ``fn`` is called as given: put a model in eval mode first (or use :func:`count_gflops`).
    """
    return split_gflops(fn, example_input)[0]


@flexivit.in_eval_mode
def count_gflops(
    model: nn.Module, image_size: int | tuple[int, int], patch_size: int | Sequence[int], *, in_chans: int = 3
) -> float:
    """Forward GFLOPs per image of ``model(x, patch_size=patch_size)`` on ``image_size`` images.

    The model is counted in eval mode (its training mode is restored afterwards), on zeros of its parameters'
    dtype and device. The batch-independent patch-embedding and position-embedding resize is excluded; see
    the module docstring.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, dtype=param.dtype, device=param.device)
    return count_gflops_fn(lambda images: model(images, patch_size=patch_size), x)


def measure_throughput(
    fn: Callable[[torch.Tensor], Any],
    example_batch: torch.Tensor,
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_time_s: float | None = None,
) -> dict[str, float]:
    """Time ``fn(example_batch)`` under ``torch.inference_mode()``.

    Runs ``warmup`` untimed calls, then times at least ``repeats`` calls (and keeps going until the timed calls
    add up to ``min_time_s`` when given) with ``time.perf_counter``, synchronising CUDA around each call when
    the batch is on a GPU. Returns ``latency_ms``, the median time of one batch, ``img_per_s`` =
    batch size / median batch time, and ``batch_size``.
    """
    batch_size = int(example_batch.shape[0])
    cuda = example_batch.is_cuda

    def sync() -> None:
        # CUDA calls return before the kernels finish; without a sync we would time the launch only.
        if cuda:
            torch.cuda.synchronize(example_batch.device)

    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example_batch)
        sync()
        while len(times) < repeats or (min_time_s is not None and sum(times) < min_time_s):
            start = time.perf_counter()
            fn(example_batch)
            sync()
            times.append(time.perf_counter() - start)
    # The median, not the mean: one slow call (a page fault, another process) should not move the result.
    median_s = statistics.median(times)
    return {"img_per_s": batch_size / median_s, "latency_ms": median_s * 1e3, "batch_size": batch_size}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: str | torch.device | None = None) -> str:
    """A one-line description of ``device`` (default: the first GPU if there is one, else the CPU).

    E.g. ``"CPU: Intel(R) Xeon(R) Processor, 2 threads"`` or ``"CUDA: NVIDIA H100 80GB HBM3"``; for report
    headers, since throughput means nothing without it.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads"
    return str(device)
