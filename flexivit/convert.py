"""Weights of other projects in this model's names and sizes: big_vision ``.npz`` and timm / open_clip state dicts.

:func:`convert_big_vision` maps flax names and layouts onto the model's (timm's) names. Loading is lossless by
default: :func:`flexivit.create_model` takes the checkpoint's own kernel size and position grid
(:func:`stored_sizes`) and pooling (:func:`stored_pooling`) as the model's, so at the checkpoint's patch size the
model computes what the checkpoint's model computed, and it still runs at every other patch size (resizing on the
fly, Sec. 3.4). Fitting the weights onto other underlying sizes (the 32x32 / 7x7 of the distillation init, Sec. 3.5)
is explicit and warns: :func:`flexify_state_dict`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .files import CheckpointError
from .model import FlexiViT
from .pi_resize import pi_resize_patch_embed, resize_posemb, to_2tuple

# ---------------------------------------------------------------------------------------------- big_vision names


def _block_names(params: dict[str, np.ndarray]) -> tuple[str, str, str]:
    """(attention, second norm, mlp) module names: big_vision numbers them 0/1/0, the original ViT code 1/2/3."""
    if any("MultiHeadDotProductAttention_0" in k for k in params):
        return "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    return "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"


def convert_big_vision(params: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map big_vision parameter names and layouts (flax: HWIO kernels, (in, out) dense) to this model's state dict."""
    params = dict(params)
    # pool_type="map" (big_vision's attention-pooling head, MAPHead_0/...; "probe" at the top in older files) is not
    # a pooling this model implements: name it, rather than list its parameters as having no place.
    map_head = sorted(k for k in params if k.startswith("MAPHead_0/") or k == "probe")
    if map_head:
        raise CheckpointError(
            f"{source}: a big_vision checkpoint with pool_type='map' (a multihead attention pooling head: "
            f"{', '.join(map_head[:3])}, ...), which this model does not implement; it loads checkpoints with "
            "pool_type 'tok' (class token) or 'gap' (mean of the tokens)"
        )
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in params:
            raise CheckpointError(f"{source}: missing key {key!r}; it has {sorted(params)[:12]}...")
        used.add(key)
        return params[key]

    # Scanned checkpoints hold each block parameter once with a leading depth axis: unstack them.
    scanned = [k for k in params if k.startswith("Transformer/encoderblock/")]
    for key in scanned:
        stacked = params.pop(key)
        for i, value in enumerate(stacked):
            params[key.replace("encoderblock/", f"encoderblock_{i}/")] = value

    sd = {
        "patch_embed.proj.weight": t(take("embedding/kernel").transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": t(take("embedding/bias")),
        "norm.weight": t(take("Transformer/encoder_norm/scale")),
        "norm.bias": t(take("Transformer/encoder_norm/bias")),
    }
    posemb_key = "pos_embedding" if "pos_embedding" in params else "Transformer/posembed_input/pos_embedding"
    sd["pos_embed"] = t(take(posemb_key))
    if "cls" in params:
        sd["cls_token"] = t(take("cls"))
    if "head/kernel" in params:
        sd["head.weight"], sd["head.bias"] = t(take("head/kernel").T), t(take("head/bias"))

    attn, norm2, mlp = _block_names(params)
    depth = len({k.split("/")[1] for k in params if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = (
            t(take(p + "LayerNorm_0/scale")),
            t(take(p + "LayerNorm_0/bias")),
        )
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = (
            t(take(p + f"{norm2}/scale")),
            t(take(p + f"{norm2}/bias")),
        )
        # q/k/v kernels are (D, heads, head_dim): flatten the heads and stack q, k, v as timm's fused qkv does.
        qkv = [take(p + f"{attn}/{n}/kernel") for n in ("query", "key", "value")]
        sd[b + "attn.qkv.weight"] = t(np.concatenate([k.reshape(k.shape[0], -1).T for k in qkv]))
        sd[b + "attn.qkv.bias"] = t(
            np.concatenate([take(p + f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        )
        out = take(p + f"{attn}/out/kernel")  # (heads, head_dim, D)
        sd[b + "attn.proj.weight"] = t(out.reshape(-1, out.shape[-1]).T)
        sd[b + "attn.proj.bias"] = t(take(p + f"{attn}/out/bias"))
        for j in (0, 1):
            sd[b + f"mlp.fc{j + 1}.weight"] = t(take(p + f"{mlp}/Dense_{j}/kernel").T)
            sd[b + f"mlp.fc{j + 1}.bias"] = t(take(p + f"{mlp}/Dense_{j}/bias"))

    unused = sorted(set(params) - used)
    if unused:
        raise CheckpointError(f"{source}: parameters this model has no place for: {unused}")
    return sd


# ---------------------------------------------------------------------------------------------- sizes and pooling


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _has_class_posemb(n: int, has_class_token: bool) -> bool:
    """Whether a position embedding of ``n`` entries holds one for the class token (timm / original ViT layout)."""
    return has_class_token and _square_side(n) is None and _square_side(n - 1) is not None


def stored_sizes(sd: dict[str, torch.Tensor], meta: dict | None = None) -> dict[str, tuple[int, int]]:
    """The underlying sizes a checkpoint stores: ``{"base_patch_size": (h, w), "posemb_grid": (gh, gw)}``.

    Read from the file itself (docs/reference.md §4: never trust a config name): the kernel's shape, and the position
    embedding's length without a class-token entry, which must be a square unless the file is one of ours (its
    ``model_kwargs`` then name the grid, which may be non-square). A size that cannot be read is left out.
    """
    kwargs = (meta or {}).get("model_kwargs") or {}
    if "posemb_grid" in kwargs and "base_patch_size" in kwargs:
        return {key: to_2tuple(kwargs[key], key) for key in ("base_patch_size", "posemb_grid")}
    sizes = {}
    kernel = sd.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4:
        sizes["base_patch_size"] = tuple(kernel.shape[-2:])
    posemb = sd.get("pos_embed")
    if posemb is not None and posemb.ndim == 3:
        n = posemb.shape[1] - int(_has_class_posemb(posemb.shape[1], "cls_token" in sd))
        if (side := _square_side(n)) is not None:
            sizes["posemb_grid"] = (side, side)
    return sizes


def stored_pooling(sd: dict[str, torch.Tensor], meta: dict | None = None) -> dict:
    """How a checkpoint's model pools, read from the file like :func:`stored_sizes`: ``{"pool", "class_token"}``.

    One of our files names both in its ``model_kwargs``. Any other file without a class token was trained without
    one, which in big_vision is ``pool_type="gap"`` (the default of its FlexiViT: the mean of the tokens after the
    final norm, as ``pool="gap"`` here). A file with a class token says nothing more: ``{}``, the model's own
    ``pool`` applies ("tok" for the registered models).
    """
    kwargs = (meta or {}).get("model_kwargs") or {}
    if "pool" in kwargs and "class_token" in kwargs:
        return {"pool": kwargs["pool"], "class_token": kwargs["class_token"]}
    return {} if "cls_token" in sd else {"pool": "gap", "class_token": False}


# ---------------------------------------------------------------------------------------------- flexify


def _warn_resize(source: str, what: str, old, new) -> None:
    warnings.warn(
        f"{source}: {what} resized {'x'.join(map(str, old))} -> {'x'.join(map(str, new))} to fit the model's "
        "underlying sizes. This is lossy: at the checkpoint's own patch size the model no longer computes exactly what "
        "the checkpoint did (create_model keeps the checkpoint's sizes unless resize_to_model=True or base_patch_size "
        "/ posemb_grid are given).",
        stacklevel=3,
    )


def flexify_state_dict(
    sd: dict[str, torch.Tensor], model: FlexiViT, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Fit a state dict onto ``model``'s underlying sizes (paper Sec. 3.5), exactly wherever that is possible.

    - LayerScale (DeiT-III) is folded into the layer it scales, and a class-token position (timm / original ViT
      layout) into the class token: both exact, because each is only ever used together with what it is folded into.
    - kernel (D, C, h, w): PI-resized to the model's underlying kernel size when the two differ;
    - position grid: resized bilinearly (antialiased where it shrinks) to the model's underlying grid when they
      differ. Either resize is lossy and warns, naming ``source`` and the sizes from -> to.
    """
    sd = dict(sd)
    # LayerScale (DeiT-III, some timm ViTs) multiplies the output of attn.proj / mlp.fc2 by a vector: folding it
    # into that layer's weight and bias is exact, so such checkpoints load into the plain block.
    for key in [k for k in sd if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        gamma, layer = sd.pop(key), key[: -len("ls1.gamma")] + ("attn.proj" if ".ls1." in key else "mlp.fc2")
        sd[layer + ".weight"] = sd[layer + ".weight"] * gamma[:, None]
        sd[layer + ".bias"] = sd[layer + ".bias"] * gamma
    kernel = sd.get("patch_embed.proj.weight")
    base = model.patch_embed.base_patch_size
    if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != tuple(base):
        _warn_resize(source, "patch-embedding kernel (PI-resize)", kernel.shape[-2:], base)
        sd["patch_embed.proj.weight"] = pi_resize_patch_embed(kernel.float(), base).to(kernel.dtype)

    posemb = sd.get("pos_embed")
    if posemb is not None and posemb.ndim == 3:
        n = posemb.shape[1]
        if model.cls_token is not None and "cls_token" in sd and _has_class_posemb(n, has_class_token=True):
            sd["cls_token"] = sd["cls_token"] + posemb[:, :1]
            posemb, n = posemb[:, 1:], n - 1
        if n == math.prod(model.posemb_grid):
            grid = model.posemb_grid  # already the model's grid (also covers non-square grids)
        elif (side := _square_side(n)) is not None:
            grid = (side, side)
        else:
            raise CheckpointError(f"{source}: cannot infer the position embedding grid from {n} positions")
        if tuple(grid) != tuple(model.posemb_grid):
            _warn_resize(source, "position embedding grid", grid, model.posemb_grid)
            posemb = resize_posemb(posemb.float().reshape(1, *grid, -1), model.posemb_grid).to(posemb.dtype)
        sd["pos_embed"] = posemb.reshape(1, -1, posemb.shape[-1])
    return sd


__all__ = ["convert_big_vision", "flexify_state_dict", "stored_pooling", "stored_sizes"]
