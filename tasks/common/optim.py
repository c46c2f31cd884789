"""Optimisers and learning-rate schedules of the paper's recipes (Appendix D; docs/reference.md §6, §9).

Parameter groups come from regular expressions on parameter names: ``frozen`` patterns get no gradients,
``lr_mults`` patterns scale the learning rate. Norm scales, biases, position embeddings and class tokens get
no weight decay, as in big_vision and timm.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients of parameters whose name matches any pattern; returns their names."""
    frozen = []
    for name, param in model.named_parameters():
        if any(re.search(p, name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise ValueError(f"frozen patterns {patterns} match no parameter")
    return frozen


def big_vision_weight_decay(wd: float, lr: float) -> float:
    """torch AdamW's ``weight_decay`` that decays like big_vision's ``config.wd`` at learning rate ``lr``: ``wd / lr``.

    big_vision adds ``wd * param`` after scaling the optimiser's update by ``lr`` and before the schedule, so one step
    changes a kernel by ``-sched(t) * (lr * update + wd * param)``: the decay follows the schedule but not ``lr``
    (big_vision/optax.py; docs/reference.md §13). torch's AdamW subtracts ``lr * sched(t) * weight_decay * param``,
    so ``weight_decay = wd / lr`` gives the same step: e.g. the FlexiViT distillation recipe's wd 1e-5 at lr 1e-4 is
    0.1 here. Passing big_vision's value as it is would decay ``1 / lr`` times too weakly (1000x at lr 1e-3).

    Convert at the learning rate the run uses: a config that changes ``optim.lr`` must recompute the decay. Unlike
    big_vision, torch also scales the decay of a group by its ``lr_mult``.
    """
    if not (math.isfinite(wd) and wd >= 0 and math.isfinite(lr) and lr > 0):
        raise ValueError(f"big_vision_weight_decay needs wd >= 0 and lr > 0 (finite), got wd={wd!r}, lr={lr!r}")
    return wd / lr


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))


def param_groups(model: nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters split by (weight decay yes/no, learning-rate multiplier)."""
    lr_mults = lr_mults or {}
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for pattern, m in lr_mults.items() if re.search(pattern, name)), 1.0)
        decay = not _no_decay(name, param)
        group = groups.setdefault(
            (decay, mult), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_mults: dict | None = None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """``sgd`` (momentum, as in the paper's transfer recipe) or ``adamw``; each group starts at ``lr * lr_mult``.

    ``fused`` (the engine sets it on CUDA): one kernel per step for all parameters, and with fp16 the loss scaler's
    inf check stays on the device instead of a host read per step."""
    groups = param_groups(model, weight_decay, lr_mults)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **({"fused": True} if fused else {}))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **({"fused": True} if fused else {}))
    raise ValueError(f"unknown optimizer {name!r}; use sgd or adamw")


def schedule_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    end_factor: float = 0.0,
    power: float = 0.9,
) -> float:
    """Learning-rate multiplier at ``step``: linear warmup from 0, then cosine / linear / poly decay or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1 - progress
    elif kind == "poly":  # the segmentation recipe (Segmenter / mmseg)
        decay = (1 - progress) ** power
    elif kind == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown schedule {kind!r}; use cosine, linear, poly or constant")
    return end_factor + (1 - end_factor) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, **kwargs))
