"""Named models: ``create_model(name, pretrained=..., **overrides)`` and ``list_models()``.

Variants are data (``VARIANTS``); a registered name is a function returning keyword arguments for
:class:`~flexivit.model.FlexiViT`. FlexiViTs keep the paper's underlying 32x32 kernel and 7x7 position grid
(Sec. 3.3); plain ViT baselines store their one patch size and the grid it gives at 240 px, so both kinds are
the same module and can be called at any patch size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .checkpoint import load_state_dict, read_pretrained
from .convert import flexify_state_dict, stored_pooling, stored_sizes
from .model import FlexiViT
from .releases import default_release

# Transformer shapes of the ViT family (Dosovitskiy et al.; Zhai et al. for "mu").
VARIANTS: dict[str, dict] = {
    "mu": dict(width=128, depth=6, num_heads=2),
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}

_MODELS: dict[str, Callable[[], dict]] = {}


def register_model(name: str):
    """Decorator: register a function returning FlexiViT keyword arguments under ``name``."""

    def wrap(fn: Callable[[], dict]) -> Callable[[], dict]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing ``pattern``, sorted."""
    return sorted(n for n in _MODELS if pattern in n)


def model_kwargs(name: str) -> dict:
    """The constructor arguments of a registered model."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return dict(_MODELS[name]())


def create_model(
    name: str, pretrained: str | Path | bool | None = None, *, resize_to_model: bool = False, **overrides
) -> FlexiViT:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: a path to a big_vision ``.npz``, a timm state dict (``.safetensors`` / ``.pth``) or a
            checkpoint of this project; a release name from ``flexivit.RELEASES`` (downloaded into the cache when
            online); or ``True`` for the model's default release (the first listed for it).
        resize_to_model: by default the model takes the checkpoint's own kernel size and position grid as its
            underlying sizes (read from the file), so loading is lossless: e.g. a timm ``flexivit_small`` file
            (16x16 kernel, 15x15 grid) gives timm's logits at patch 16, and the model still runs at every patch
            size. ``True`` PI-resizes the kernel and resizes the position grid to the registered underlying sizes
            instead (32x32 and 7x7 for FlexiViTs: the distillation init of paper Sec. 3.5); so do explicit
            ``base_patch_size`` / ``posemb_grid`` overrides. A lossy resize warns, naming from -> to. The pooling
            is read from the file too: one without a class token (big_vision's ``pool_type="gap"``) gives
            ``pool="gap", class_token=False``.
        **overrides: any FlexiViT keyword argument, e.g. ``num_classes=10`` or ``drop_path_rate=0.1``.
    """
    kwargs = model_kwargs(name)
    if pretrained is None or pretrained is False or pretrained == "":
        return FlexiViT(**{**kwargs, **overrides})
    if pretrained is True:
        pretrained = default_release(name)
    sd, meta, path = read_pretrained(pretrained)
    if "num_classes" not in overrides:  # like timm: keep the checkpoint's head unless told otherwise
        kwargs["num_classes"] = sd["head.bias"].shape[0] if "head.bias" in sd else 0
    kwargs.update(stored_pooling(sd, meta))  # e.g. big_vision's "gap": no class token in the file
    if not resize_to_model:
        kwargs.update(stored_sizes(sd, meta))
    model = FlexiViT(**{**kwargs, **overrides})
    load_state_dict(model, flexify_state_dict(sd, model, source=str(path)), source=str(path))
    return model


def _register_flexivit(variant: str) -> None:
    @register_model(f"flexivit_{variant}")
    def _kwargs() -> dict:
        return dict(**VARIANTS[variant], base_patch_size=32, posemb_grid=7, patch_size=16)


def _register_vit(variant: str, patch: int, image_size: int = 240) -> None:
    @register_model(f"vit_{variant}_patch{patch}")
    def _kwargs() -> dict:
        return dict(**VARIANTS[variant], base_patch_size=patch, posemb_grid=image_size // patch, patch_size=patch)


for _variant in VARIANTS:
    _register_flexivit(_variant)
# The paper's baselines (B/16, B/30), its distillation teacher (B/8) and the usual fixed-patch shapes.
for _variant, _patch in [
    ("mu", 8), ("mu", 16), ("mu", 30),
    ("tiny", 16), ("small", 16), ("small", 30),
    ("base", 8), ("base", 16), ("base", 30), ("base", 32), ("large", 16),
]:  # fmt: skip
    _register_vit(_variant, _patch)
