"""What every dense head on a FlexiViT shares: the token map, Segmenter's padding, and the plug-ins' backbone.

A dense head reads the backbone's ``tokens`` (B, N, D) and ``grid`` (gh, gw) of the call and reshapes them with
:func:`tokens_to_map`; it never asks the backbone for a stored patch size or resolution (STYLE.md 5). Inputs that the
patches do not tile are padded first (:func:`pad_to_multiple`), as Segmenter does, so no border is dropped. Used by
tasks.segmentation and by the detectron2 and mmseg plug-ins, which also build their FlexiViT with
:func:`dense_backbone`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import flexivit
from flexivit.model import FlexiViT, PatchSize
from flexivit.pi_resize import to_2tuple
from tasks.common.train_state import resolve_checkpoint

# The classification main job's workdir, which the plug-ins' scenes configs load their backbone from.
MAIN_JOB_WORKDIR = "runs/fashion_mnist"


def pad_to_multiple(images: torch.Tensor, patch_size: PatchSize, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right so that H and W are multiples of the patch size.

    Segmenter pads with 0 in normalised space (the mean colour for mean/std normalisation).
    """
    ph, pw = to_2tuple(patch_size, "patch_size")
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % ph, -w % pw
    return F.pad(images, (0, pad_w, 0, pad_h), value=value) if pad_h or pad_w else images


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, N, D) in row-major grid order -> a feature map (B, D, gh, gw)."""
    b, n, d = tokens.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill the grid {gh}x{gw}")
    return tokens.transpose(1, 2).reshape(b, d, gh, gw)


def dense_backbone(name: str, pretrained: str | Path | None = None, overrides: dict | None = None) -> FlexiViT:
    """A registered FlexiViT without its classifier head, as the plug-ins' backbone.

    ``pretrained``: a release name, a FlexiViT / timm / big_vision file, or a ``tools.train`` workdir (its last
    checkpoint); the kernel and position grid are flexified on load as in ``flexivit.create_model``. ``None`` or ""
    initialises randomly, which is all a run needs when a checkpoint loaded afterwards replaces every weight
    (evaluation, resuming). ``overrides``: any FlexiViT keyword arguments.
    """
    if pretrained and str(pretrained) not in flexivit.RELEASES and not Path(pretrained).exists():
        if Path(pretrained).resolve() == Path(MAIN_JOB_WORKDIR).resolve():
            what = "is the classification main job's workdir, not trained yet: run `bash tools/main.sh` first, or"
        else:
            what = f"is neither a file, a workdir nor a release name ({', '.join(flexivit.RELEASES)}):"
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} {what} set it to None to initialise randomly, which is enough when a "
            "checkpoint loaded afterwards replaces every weight, as for evaluation (`model.backbone.pretrained=null` "
            "on detectron2's command line, `--cfg-options model.backbone.pretrained=None` on mmseg's)"
        )
    if pretrained:
        pretrained = resolve_checkpoint(pretrained)
    return flexivit.create_model(name, pretrained=pretrained or None, **{**(overrides or {}), "num_classes": 0})
