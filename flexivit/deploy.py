"""Deployment fast path: a FlexiViT fixed to one patch size, with the resized weights baked in.

A flexible model resizes its patch-embedding kernel (PI-resize, Sec. 3.4) and its position embedding (Sec. 3.3)
in every forward pass. Once a deployment has chosen its patch size and image size, both resizes always give the
same result, so :func:`fix_patch_size` computes them once and stores them as the new model's underlying sizes:

>>> fast = fix_patch_size(model, patch_size=16, image_size=240)   # kernel 16x16, position grid 15x15
>>> torch.equal(fast(images), model(images, patch_size=16))   # for 240 px images
True

At that patch size and image size no resize runs any more (both resize functions return the stored parameter
itself when the sizes match), so inference costs exactly what a plain ViT with that patch size costs. The result is
still a :class:`~flexivit.model.FlexiViT` and can be called at other patch sizes, but it then resizes from the
fixed sizes rather than from the underlying 32x32 kernel and 7x7 grid: keep the flexible model for that.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .model import FlexiViT, PatchSize
from .pi_resize import Size, to_2tuple


def fix_patch_size(model: FlexiViT, patch_size: PatchSize, image_size: int | Sequence[int]) -> FlexiViT:
    """A copy of ``model`` fixed to ``patch_size`` on ``image_size`` images, with the resized weights stored.

    Args:
        model: a flexible model (left unchanged).
        patch_size: the deployment patch size, ``p`` or ``(ph, pw)``; it becomes the default patch size.
        image_size: the deployment image size, ``s`` or ``(h, w)``; the position embedding is stored for the grid
            ``image_size // patch_size`` (a border that the patches do not tile is dropped, as in the model).

    The kernel is resized the way the model resizes it (``model.patch_embed.kernel_resize``: PI or bilinear) and
    the position embedding with the model's own resize, in the parameters' dtype and on their device, so the
    fixed model gives the flexible model's outputs at that size. Every other parameter, buffer, the head, the
    training mode and ``requires_grad`` flags are copied as they are. ``kwargs`` is updated, so that
    :func:`~flexivit.checkpoint.save_model` writes a checkpoint that rebuilds the fixed model.
    """
    patch = to_2tuple(patch_size, "patch_size")
    image = to_2tuple(image_size, "image_size")
    grid: Size = (image[0] // patch[0], image[1] // patch[1])
    if min(grid) < 1:
        raise ValueError(f"patch size {patch} does not fit images of size {image}")

    with torch.no_grad():
        # clone(): at the model's own sizes a resize returns the parameter itself, which must not be shared.
        kernel = model.patch_embed.resized_weight(patch).detach().clone()
        posemb = model.posemb_for_grid(grid).detach().clone()  # (1, gh*gw, D)

    fixed = copy.deepcopy(model)
    old = fixed.patch_embed.proj
    proj = nn.Conv2d(
        old.in_channels,
        old.out_channels,
        kernel_size=patch,
        stride=patch,
        bias=old.bias is not None,
        device=kernel.device,
        dtype=kernel.dtype,
    )
    proj.weight = nn.Parameter(kernel, requires_grad=old.weight.requires_grad)
    if old.bias is not None:
        proj.bias = old.bias
    fixed.patch_embed.proj = proj
    fixed.patch_embed.base_patch_size = patch
    fixed.pos_embed = nn.Parameter(posemb, requires_grad=model.pos_embed.requires_grad)
    fixed.posemb_grid = grid
    fixed.patch_size = patch
    fixed.kwargs = {
        **model.kwargs,
        "base_patch_size": _compact(patch),
        "posemb_grid": _compact(grid),
        "patch_size": _compact(patch),
        "num_classes": model.num_classes,  # reset_classifier may have changed the head since construction
    }
    return fixed


def to_timm(model: FlexiViT, patch_size: PatchSize, image_size: int | Sequence[int]) -> tuple[dict, dict]:
    """``(state_dict, kwargs)`` of a plain timm ``VisionTransformer`` that computes ``model`` at one patch size:

    >>> state, kwargs = to_timm(model, patch_size=16, image_size=240)
    >>> vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)   # the kwargs set every shape
    >>> vit.load_state_dict(state)

    The kernel and position embedding are those of :func:`fix_patch_size`; timm's ``no_embed_class=True`` adds the
    position embedding before the class token is prepended, as FlexiViT does (the class token has none), and
    ``fc_norm=False`` keeps the final norm before pooling for ``pool="gap"`` (timm would normalise after).
    """
    fixed = fix_patch_size(model, patch_size, image_size)
    kwargs = timm_kwargs(model, patch_size, image_size)
    # The names are timm's already (checkpoint.py reads timm files with the same keys).
    state = {key: value.detach().clone() for key, value in fixed.state_dict().items()}
    return state, kwargs


def timm_kwargs(model: FlexiViT, patch_size: PatchSize, image_size: int | Sequence[int]) -> dict:
    """The timm ``VisionTransformer`` arguments of ``model``'s shape at one patch size (see :func:`to_timm`)."""
    kw = model.kwargs
    if kw["norm_eps"] != 1e-6:
        raise ValueError(f"timm's ViT normalises with eps 1e-6; this model uses norm_eps {kw['norm_eps']}")
    return dict(
        img_size=_compact(to_2tuple(image_size, "image_size")),
        patch_size=_compact(to_2tuple(patch_size, "patch_size")),
        in_chans=kw["in_chans"],
        embed_dim=kw["width"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=kw["qkv_bias"],
        class_token=kw["class_token"],
        no_embed_class=True,
        global_pool="token" if kw["pool"] == "tok" else "avg",
        fc_norm=False,
        num_classes=model.num_classes,
        act_layer="gelu_tanh" if kw["gelu_approximate"] == "tanh" else "gelu",
    )


def _compact(pair: Size) -> int | list[int]:
    # The notation of the constructor and the registry: an int when square; a list keeps checkpoints JSON-clean.
    return pair[0] if pair[0] == pair[1] else list(pair)


__all__ = ["fix_patch_size", "timm_kwargs", "to_timm"]
