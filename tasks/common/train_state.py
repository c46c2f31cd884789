"""Training checkpoints: model, optimiser, scheduler, scaler and step, written durably, last K kept.

Neither the data position nor the random state needs saving: the batches of step ``s`` are a function of
``(seed, s)`` (tasks/common/loader.py) and every random draw of a step comes from the RNG the engine seeds with
``(seed, step, rank)`` (tools/train.py), so the step is enough to resume exactly, on every rank.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from flexivit.files import CheckpointError, atomic_write, torch_load

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


def save_train_state(workdir, step, model, optimizer, scheduler, scaler, config, keep: int = 2, info=None) -> Path:
    """Write ``checkpoints/ckpt_{step}.pt`` durably (temp file, fsync, rename), then delete all but the last ``keep``.

    Older checkpoints are deleted only once the new one is on disk, so a crash at any moment leaves a readable one.
    Besides the training state it holds what rebuilds the model for inference alone (tasks.load_run): the model's
    constructor arguments, the resolved config and the task's ``info`` (class names, category metadata, ...).
    """
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_kwargs": dict(model.kwargs),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "config": config.to_json(),
        "info": info,
    }
    path = Path(workdir) / "checkpoints" / f"ckpt_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoints(workdir)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def read_run_checkpoint(path: str | Path) -> tuple[str | None, object]:
    """``(config JSON, task info)`` of a checkpoint :func:`save_train_state` wrote; ``None`` for what it lacks (a
    saved model file has neither; a checkpoint from before they were saved has no info)."""
    state = torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (a {type(state).__name__}, not a dict)")
    return state.get("config"), state.get("info")


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose weights do not fit the model (another architecture): not a damaged file."""


def state_dict_mismatch(expected: dict, found: dict, limit: int = 8) -> list[str]:
    """What keeps ``found`` (a file's state dict) from loading into a model whose state dict is ``expected``: one
    line per missing, unexpected or differently shaped tensor (the first ``limit`` of each kind, then a count)."""
    shape = {k: tuple(v.shape) for k, v in found.items() if hasattr(v, "shape")}
    kinds = {
        "missing from the file": [k for k in expected if k not in found],
        "not in the model": [k for k in found if k not in expected],
        "of another shape": [
            f"{k}: file {shape[k]} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in shape and shape[k] != tuple(v.shape)
        ],
    }
    return [
        f"{kind}: {', '.join(items[:limit])}" + (f" and {len(items) - limit} more" if len(items) > limit else "")
        for kind, items in kinds.items()
        if items
    ]


def load_weights(model: torch.nn.Module, state: dict, path) -> torch.nn.Module:
    """``model`` with the weights of ``state`` (read from ``path``), loaded strictly: what does not fit is named, one
    line per kind, instead of torch's size-mismatch text. For the tasks' ``load_model``."""
    problems = state_dict_mismatch(model.state_dict(), state, limit=3)
    if problems:
        raise CheckpointMismatchError(
            f"{path}: its weights do not fit the model its model_kwargs describe:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(state)
    return model


def load_train_state(path, model, optimizer, scheduler, scaler) -> int:
    """Restore everything saved by :func:`save_train_state`; returns the step to continue from."""
    state = torch_load(path)
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (it lacks {missing})")
    problems = state_dict_mismatch(model.state_dict(), state["model"])
    if problems:
        raise CheckpointMismatchError(
            f"{path} holds another model than the config builds (was model.* changed with --set?):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def load_latest_train_state(workdir, model, optimizer, scheduler, scaler) -> tuple[Path, int] | None:
    """Restore the newest readable checkpoint of ``workdir``: ``(its path, its step)``, or None when there is none.

    A checkpoint that cannot be read (truncated by a full disk, damaged) is skipped with a warning naming it, and the
    next older one is tried; if none is readable, the error names every file tried.
    """
    errors = []
    for path in reversed(checkpoints(workdir)):
        try:
            return path, load_train_state(path, model, optimizer, scheduler, scaler)
        except CheckpointError as e:
            warnings.warn(f"cannot resume from {path}, trying the previous checkpoint: {e}", stacklevel=2)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no readable checkpoint in {Path(workdir) / 'checkpoints'}:\n  " + "\n  ".join(errors))
    return None
