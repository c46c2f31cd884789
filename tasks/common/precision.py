"""Numeric precision, one table for the engine and the tools: fp32, or autocast in bf16 / fp16.

Autocast keeps the residual stream and the losses in float32 while the matmuls run in the lower precision; the
backward runs outside autocast (tools/train.py). On CPUs with AMX / avx512_bf16, bf16 matmuls are ~2-3x fp32's; on
AVX2-only CPUs they are slower than fp32 (measure: ``python -m tools.benchmarks.precision``); fp16 needs a GPU and a
loss scaler.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (fp32: None, i.e. no autocast) on ``device``; fp16 needs a GPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
