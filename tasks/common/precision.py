"""Numeric precision, one table for the engine and the tools: fp32, or autocast in bf16 / fp16.

Autocast keeps the residual stream and the losses in float32 while the matmuls run in the lower precision; the
backward runs outside autocast (tools/train.py). On CPUs with AMX / avx512_bf16, bf16 matmuls are ~2-3x fp32's; on
AVX2-only CPUs they are slower than fp32 (measure: ``python -m tools.benchmarks.precision``); fp16 needs a GPU and a
loss scaler. In fp32 on a GPU the matmuls and convolutions run in TF32 unless turned off (:func:`use_tf32`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (fp32: None, i.e. no autocast) on ``device``; fp16 needs a GPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if precision == "bf16":
        _warn_if_bf16_emulated(device)
    return PRECISIONS[precision]


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware rather than emulating it (then bf16 is slower than fp32).

    CUDA: compute capability 8.0+ (A100, H100, RTX 30xx on; V100 and T4 emulate). CPU: the ``avx512_bf16`` or
    ``amx_bf16`` flags of /proc/cpuinfo (ARM: ``bf16``). Where it cannot be told (no /proc/cpuinfo, other device
    types) it counts as supported, so that nothing warns without cause.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            with torch.cuda.device(device):  # is_bf16_supported asks the current device
                return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4: no including_emulation; bf16 units came with Ampere (8.0)
            return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        flags = _cpu_flags()
        return flags is None or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return True


@functools.lru_cache(maxsize=1)
def _cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``) from /proc/cpuinfo; None where it is not there."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.split(":")[0].strip() in ("flags", "Features")]
    except OSError:
        return None
    return frozenset(word for line in lines for word in line.split(":", 1)[1].split()) if lines else None


_WARNED_BF16: set[str] = set()  # device types already warned about (once per process each)


def _warn_if_bf16_emulated(device: torch.device) -> None:
    device = torch.device(device)
    if device.type in _WARNED_BF16 or bf16_supported(device):
        return
    _WARNED_BF16.add(device.type)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    warnings.warn(
        f"bf16 is emulated on {where} (no bf16 units): it runs slower than fp32 here; use fp16 with the loss "
        "scaler on a GPU (V100, T4), fp32 on a CPU",
        stacklevel=3,
    )


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_tf32(precision: str, allowed: bool = True) -> bool:
    """The TF32 policy of the engine and the tools; returns whether TF32 is on.

    With CUDA, float32 matmuls and cuDNN convolutions use TF32 (inputs rounded to a 10-bit mantissa, float32
    accumulation; on A100 / H100 several times the float32 rate) when ``precision`` is fp32 and ``allowed`` (config
    ``train.tf32``), and full float32 otherwise: under bf16 / fp16 autocast the matmuls run in the low precision
    already, and the few float32 ones left (a loss computed in float32 on purpose) keep their precision. Without
    CUDA nothing is set. The flags are process-wide, so each call sets both, whatever a previous call set.

    Set through ``allow_tf32``, not PyTorch 2.9's ``fp32_precision``: that one makes reading ``allow_tf32`` (as
    torch.compile's inductor does) raise "mix of the legacy and new APIs", while ``allow_tf32`` keeps both in step.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not torch.cuda.is_available():
        return False
    on = bool(allowed) and precision == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on
