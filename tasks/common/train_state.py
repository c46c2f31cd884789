"""Training checkpoints: model, optimiser, scheduler, scaler, step and RNG, written atomically, last K kept.

The data position needs no state of its own: the batches of step ``s`` are a function of ``(seed, s)``
(tasks/common/loader.py), so the step is enough to resume the data stream exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from flexivit.checkpoint import atomic_write

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


def checkpoints(workdir: str | Path) -> list[Path]:
    """The workdir's checkpoints, oldest first."""
    folder = Path(workdir) / "checkpoints"
    found = [p for p in folder.glob("ckpt_*.pt") if _NAME.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def latest_checkpoint(workdir: str | Path) -> Path | None:
    found = checkpoints(workdir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint file or release name as given, or the last checkpoint of a training workdir."""
    if Path(path).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"workdir {path} holds no checkpoint (checkpoints/ckpt_*.pt)")
        return str(found)
    return str(path)


def save_train_state(workdir, step, model, optimizer, scheduler, scaler, config, keep: int = 2) -> Path:
    """Write ``checkpoints/ckpt_{step}.pt`` (temp file + rename) and delete all but the last ``keep``."""
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_kwargs": dict(model.kwargs),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "config": config.to_json(),
    }
    path = Path(workdir) / "checkpoints" / f"ckpt_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoints(workdir)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_train_state(path, model, optimizer, scheduler, scaler) -> int:
    """Restore everything saved by :func:`save_train_state`; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
