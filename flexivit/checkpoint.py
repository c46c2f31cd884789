"""Loading weights into a model, and this project's own checkpoints: the door behind ``create_model(pretrained=)``.

- :func:`read_checkpoint` reads any supported file (big_vision ``.npz``, timm / open_clip state dicts, our own
  ``.pt`` / ``.safetensors``) into this model's names, with the safe readers of :mod:`flexivit.files`;
- :func:`load_state_dict` loads strictly: keys that are missing, unexpected or wrongly shaped raise an error that
  lists them (only the classification head may differ, with a warning);
- :func:`save_model` / :func:`load_model`: weights plus constructor arguments, so that a file alone rebuilds its
  model; written atomically.

Name mapping and resizing live in :mod:`flexivit.convert`, the official releases in :mod:`flexivit.releases`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .convert import convert_big_vision, flexify_state_dict
from .files import CheckpointError, atomic_write, read_npz, read_safetensors, torch_load
from .model import FlexiViT
from .releases import RELEASES, release_path

# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights from any supported file: ``(state_dict in this model's names, metadata)``.

    ``metadata`` holds ``model_kwargs`` when the file is one of this project's checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta: dict = {}
    if path.suffix == ".npz":
        return convert_big_vision(read_npz(path), source=str(path)), meta
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path)
    else:
        obj = torch_load(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        # A training checkpoint (ours, Lightning, many others) nests the weights under one of these keys.
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                meta = {k: v for k, v in obj.items() if k == "model_kwargs"}
                obj = obj[key]
                break
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    # DistributedDataParallel and torch.compile wrap the model and prefix every name.
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    return sd, meta


# ---------------------------------------------------------------------------------------------- loading


def load_state_dict(model: FlexiViT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a (flexified) state dict strictly, except for the classification head, which may differ (with a warning).

    The head is the transfer case (ImageNet-21k weights, 10 new classes): a head of another size, or a head that the
    model does not have, is not loaded; a model head that the file lacks keeps its fresh initialisation (zeros: it
    predicts class 0 until trained). Each of these warns. Any other missing, unexpected or wrongly shaped key is an
    error that lists them all.
    """
    own = model.state_dict()
    sd = dict(sd)

    def head(state):  # "10-class head (10, 384)", or None
        return (
            f"{state['head.bias'].shape[0]}-class head {tuple(state['head.weight'].shape)}"
            if "head.bias" in state
            else None
        )

    if any(k.startswith("head.") and (k not in own or own[k].shape != v.shape) for k, v in sd.items()):
        kept = f"the model's {head(own)} is freshly initialised" if head(own) else "the model has no head"
        warnings.warn(f"{source}: its {head(sd)} is not loaded ({kept})", stacklevel=3)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    elif head(own) and not head(sd):
        warnings.warn(
            f"{source} has no classification head: the model's {head(own)} keeps its fresh initialisation "
            "(zero-initialised, it predicts class 0 until it is trained)",
            stacklevel=3,
        )
    # A head the checkpoint lacks is not missing: the model keeps its freshly initialised one.
    missing = [k for k in own if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        hint = (
            "\n  the file has no class token (big_vision pool_type='gap'): build the model with pool='gap', "
            "class_token=False (create_model reads this from the file unless overridden)"
            if "cls_token" in missing
            else ""
        )
        raise CheckpointError(
            f"{source} does not fit the model:\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  wrong shape: {wrong}{hint}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def read_pretrained(pretrained: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Read a file or an official release name: ``(state_dict, metadata, path)``."""
    source = str(pretrained)
    path = release_path(source) if source in RELEASES else Path(source)
    sd, meta = read_checkpoint(path)
    return sd, meta, path


def load_pretrained(model: FlexiViT, pretrained: str | Path) -> FlexiViT:
    """Load a file or an official release name into ``model``, resized to its underlying sizes where they differ."""
    sd, _, path = read_pretrained(pretrained)
    load_state_dict(model, flexify_state_dict(sd, model, source=str(path)), source=str(path))
    return model


# ---------------------------------------------------------------------------------------------- own checkpoints


def save_model(model: FlexiViT, path: str | Path) -> None:
    """Save weights and constructor arguments, atomically: ``.safetensors`` or a weights-only ``.pt``."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    kwargs = dict(model.kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"flexivit": json.dumps({"model_kwargs": kwargs})}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"model": sd, "model_kwargs": kwargs}, tmp))


def load_model(path: str | Path, **overrides) -> FlexiViT:
    """Rebuild a model saved by :func:`save_model` (or the training engine) from the file alone."""
    sd, meta = read_checkpoint(path)
    if "model_kwargs" not in meta:
        raise CheckpointError(f"{path} has no model_kwargs: load it with create_model(name, pretrained=path)")
    if "backbone" in meta["model_kwargs"]:  # a task model (backbone + head) saved by the training engine
        raise CheckpointError(
            f"{path} holds a task model (a backbone inside, model_kwargs {sorted(meta['model_kwargs'])}): rebuild it "
            "with its task's loader, e.g. tasks.segmentation.load_model(path)"
        )
    model = FlexiViT(**{**meta["model_kwargs"], **overrides})
    load_state_dict(model, flexify_state_dict(sd, model, source=str(path)), source=str(path))
    return model


__all__ = [
    "load_model",
    "load_pretrained",
    "load_state_dict",
    "read_checkpoint",
    "read_pretrained",
    "save_model",
]
