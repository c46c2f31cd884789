"""UViM stage I: the restricted oracle, a VQ-VAE of panoptic maps that also sees the image (docs/reference.md §10).

The oracle encodes the ground-truth panoptic target into a short sequence of discrete codes and decodes it back,
both sides given the image as context, so the codes only need to carry what the image does not say. Stage II then
learns to predict these codes from the image alone. Everything here runs at one fixed patch size: only stage II's
image encoder needs to be flexible (the paper initialises it with FlexiViT).

    encode: one-hot(semantic) and one-hot(instance), each embedded per patch by a dense layer over (channels, p, p)
            (a stride-p convolution is exactly that), summed, + image context (its own stride-p convolution) +
            learned position embedding -> ViT encoder -> grid resized to the code grid (bilinear, antialiased
            as jax.image.resize) -> dense -> standardised per vector -> vector quantiser
    decode: codes -> dense -> bilinearly resized to the patch grid -> + image context (a second convolution) +
            position embedding -> ViT decoder -> zero-initialised per-patch heads -> per-pixel logits of both channels
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import flexivit
from flexivit.model import Block
from flexivit.pi_resize import to_2tuple
from tasks import Task
from tasks.common.precision import autocast
from tasks.common.train_state import load_weights, resolve_checkpoint

from .data import build_datasets, evaluate_pq
from .vq import VectorQuantizer, code_dropout

__all__ = [
    "TASK",
    "Oracle",
    "build_datasets",
    "build_model",
    "evaluate",
    "image_forward",
    "load_model",
    "make_loss",
    "oracle_loss",
    "to_panoptic",
]


def _blocks(width: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(
        *[
            Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=1e-6, gelu_approximate="tanh")
            for _ in range(depth)
        ]
    )


def _standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance over the last axis (jax.nn.standardize)."""
    mean = x.mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


class Oracle(nn.Module):
    """UViM's stage I model for panoptic maps.

    Args:
        num_classes: semantic classes including void (class 0), e.g. 134 for COCO panoptic.
        max_instances: instance channels, ids 0..max_instances-1, where 0 means "in no segment" (void) and
            segments are numbered 1.. canonically (UViM: 100). A negative id (a pixel to ignore, e.g. crowd) is an
            empty one-hot and gives no loss.
        image_size, patch_size: the square input and the fixed patch size (UViM panoptic: 512 and 16).
        code_len: codes per image, a square number (UViM: 256, a 16x16 code grid).
        dict_size: codewords (UViM: 4096).
        width, enc_depth, dec_depth, num_heads, mlp_ratio: the two ViTs (UViM: 768, 6, 12, 12, 4).
        code_dropout: ``"none"``, ``"prefix"`` or ``"random"`` (vq.code_dropout), in training only.
    """

    def __init__(
        self,
        num_classes: int,
        max_instances: int,
        *,
        image_size: int,
        patch_size: int,
        code_len: int,
        dict_size: int,
        width: int,
        enc_depth: int,
        dec_depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        code_dropout: str = "none",
        seed: int = 0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        side = math.isqrt(code_len)
        if side * side != code_len:
            raise ValueError(f"code_len {code_len} must be a square number (the codes form a square grid)")
        self.kwargs = dict(
            num_classes=num_classes, max_instances=max_instances, image_size=image_size, patch_size=patch_size,
            code_len=code_len, dict_size=dict_size, width=width, enc_depth=enc_depth, dec_depth=dec_depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, code_dropout=code_dropout, seed=seed,
        )  # fmt: skip
        self.num_classes, self.max_instances, self.patch_size = num_classes, max_instances, patch_size
        self.grid, self.code_side, self.code_dropout = image_size // patch_size, side, code_dropout
        p = patch_size
        self.embed_semantic = nn.Conv2d(num_classes, width, p, stride=p)
        self.embed_instance = nn.Conv2d(max_instances, width, p, stride=p)
        self.context_encoder = nn.Conv2d(3, width, p, stride=p)
        self.context_decoder = nn.Conv2d(3, width, p, stride=p)
        tokens = self.grid * self.grid
        self.posemb_encoder = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.posemb_decoder = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.encoder = _blocks(width, enc_depth, num_heads, mlp_ratio)
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.encoder_head = nn.Linear(width, width)
        self.quantizer = VectorQuantizer(dict_size, width, seed=seed)
        self.decoder_stem = nn.Linear(width, width)
        self.decoder = _blocks(width, dec_depth, num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.head_semantic = nn.Linear(width, num_classes * p * p)
        self.head_instance = nn.Linear(width, max_instances * p * p)
        for head in (self.head_semantic, self.head_instance):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> Oracle:
        """A freshly initialised oracle of the shape recorded in ``model.kwargs`` (load its state after)."""
        kwargs = dict(kwargs)
        return cls(kwargs.pop("num_classes"), kwargs.pop("max_instances"), **kwargs)

    # ------------------------------------------------------------------ helpers

    def _one_hot(self, semantic: torch.Tensor, instance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_range(semantic, 0, self.num_classes, "semantic classes")
        _check_range(instance, -1, self.max_instances, "instance ids")
        sem = F.one_hot(semantic, self.num_classes).permute(0, 3, 1, 2).float()
        ins = F.one_hot(instance + 1, self.max_instances + 1)[..., 1:].permute(0, 3, 1, 2).float()  # -1: all zeros
        return sem, ins

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)

    def _resize_grid(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """(B, n*n, C) tokens -> (B, side*side, C) as big_vision's UViM resizes its bottleneck both ways,
        ``jax.image.resize(x, shape, method="linear")`` (``models/proj/uvim/vit.py``; docs/reference.md §10):
        half-pixel centres, antialiased when it shrinks (the encoder's grid to the code grid: the triangle kernel
        widened by the factor, so every token contributes) and plain bilinear when it grows (the codes to the
        decoder's grid). At least float32: torch's antialiased kernel has no bf16 on the CPU."""
        b, n, c = x.shape
        old = math.isqrt(n)
        grid = x.transpose(1, 2).reshape(b, c, old, old).to(torch.promote_types(x.dtype, torch.float32))
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=side < old)
        return grid.to(x.dtype).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ the two halves

    def encode(self, images, semantic, instance, update_dict: bool = True) -> dict:
        """-> dict ``quantised`` (B, code_len, width), ``codes`` (B, code_len), ``bottleneck`` (before VQ)."""
        sem, ins = self._one_hot(semantic, instance)
        x = self._tokens(self.embed_semantic(sem) + self.embed_instance(ins) + self.context_encoder(images))
        x = self.encoder_norm(self.encoder(x + self.posemb_encoder))
        x = self.encoder_head(self._resize_grid(x, self.code_side))
        bottleneck = _standardize(x)
        quantised, codes = self.quantizer(bottleneck, update=update_dict)
        return {"quantised": quantised, "codes": codes, "bottleneck": bottleneck}

    def decode(self, quantised: torch.Tensor, images: torch.Tensor) -> dict:
        """Quantised codes (B, code_len, width) (or code indices (B, code_len)) and the images -> per-pixel logits
        ``semantic`` (B, K, H, W) and ``instance`` (B, I, H, W)."""
        if quantised.dtype == torch.long:
            quantised = self.quantizer.embed(quantised)
        if self.training:
            quantised = code_dropout(quantised, self.code_dropout)
        x = self._resize_grid(self.decoder_stem(quantised), self.grid)
        x = x + self._tokens(self.context_decoder(images))
        x = self.decoder_norm(self.decoder(x + self.posemb_decoder))
        return {
            "semantic": self._unpatchify(self.head_semantic(x), self.num_classes),
            "instance": self._unpatchify(self.head_instance(x), self.max_instances),
        }

    def _unpatchify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        b, g, p = x.shape[0], self.grid, self.patch_size
        return x.view(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, g * p, g * p)

    def forward(self, images, semantic, instance) -> dict:
        encoded = self.encode(images, semantic, instance)
        return {**self.decode(encoded["quantised"], images), "codes": encoded["codes"]}


def _check_range(values: torch.Tensor, low: int, high: int, what: str) -> None:
    """ValueError unless ``low <= values < high``, without waiting for the device: an asynchronous assert that the
    CPU evaluates at once and a GPU when it gets there (as a device-side assert; the data pipeline, which builds the
    maps on the CPU, is where a bad map is caught with its file)."""
    message = f"{what} must lie in {low}..{high - 1}"
    try:
        torch._assert_async((values.min() >= low) & (values.max() < high), message)
    except RuntimeError as err:
        raise ValueError(f"{message}, got {values.unique()[:8]}") from err


def oracle_loss(logits: dict, semantic: torch.Tensor, instance: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``(loss, terms)``: the mean per-pixel softmax cross-entropy of the semantic channel (void is class 0) plus that
    of the instance channel (id 0 = in no segment); pixels with a negative instance id are left out of the latter."""
    semantic_ce = F.cross_entropy(logits["semantic"].float(), semantic)
    # The mean over the counted pixels as a sum over their count (at least 1): every pixel ignored gives 0, not 0 / 0,
    # with no test on the host (an ``if`` on a device value would wait for the device at every step).
    instance_sum = F.cross_entropy(logits["instance"].float(), instance.clamp(min=-1), ignore_index=-1, reduction="sum")
    instance_ce = instance_sum / (instance >= 0).sum().clamp(min=1)
    return semantic_ce + instance_ce, {"semantic": semantic_ce.detach(), "instance": instance_ce.detach()}


def to_panoptic(logits: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel logits -> ``(semantic, instance)`` maps (B, H, W) int64: the instance is the per-pixel argmax of the
    instance channel, and each instance's class the argmax of the semantic logits summed over its pixels
    (docs/reference.md §10). Pixels of instance 0, or of an instance classed void, are void (0, 0)."""
    semantic_logits, instance_logits = logits["semantic"].float(), logits["instance"].float()
    instance = instance_logits.argmax(1)  # (B, H, W)
    b = semantic_logits.shape[0]
    one_hot = F.one_hot(instance, instance_logits.shape[1]).float()  # (B, H, W, I)
    per_instance = torch.einsum("bkhw,bhwi->bik", semantic_logits, one_hot)  # summed semantic logits (B, I, K)
    classes = per_instance.argmax(-1)  # (B, I)
    semantic = torch.gather(classes, 1, instance.view(b, -1)).view_as(instance)
    void = (instance == 0) | (semantic == 0)
    return torch.where(void, 0, semantic), torch.where(void, 0, instance)


# ---------------------------------------------------------------------------------------------- the task face
# ``task="panoptic.stage1"``: tools/train.py trains the oracle with these (tasks/__init__.py lists the interface).


# The model block's keys that size the oracle (configs/panoptic/common.py).
ORACLE_KEYS = (
    "patch_size", "code_len", "dict_size", "width", "enc_depth", "dec_depth", "num_heads", "mlp_ratio",
    "code_dropout", "seed",
)  # fmt: skip


def build_model(model_cfg, info) -> Oracle:
    """The oracle for the dataset's classes (+ void) and the data's image size; sizes from ``model_cfg``."""
    settings = {key: getattr(model_cfg, key) for key in ORACLE_KEYS}
    return Oracle(info["num_classes"], info["max_instances"], image_size=info["image_size"], **settings)


def load_model(path) -> Oracle:
    """Rebuild an oracle from a checkpoint the engine wrote (a file or a workdir), from the file alone."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    if "code_len" not in kwargs or "dict_size" not in kwargs:
        raise flexivit.CheckpointError(f"{path} is not a UViM stage I checkpoint (no code_len / dict_size saved)")
    model = Oracle.from_kwargs(kwargs)
    return load_weights(model, state, path)


def make_loss(config, info, teacher=None):
    """The oracle's reconstruction loss: no config key changes it, and stage I has one patch size, so the step's
    ``patch_size`` is not used (nor a teacher: the contract refuses distillation, ``engine_features`` is empty)."""

    def loss(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        images, semantic, instance = batch
        return oracle_loss(net(images, semantic, instance), semantic, instance)

    return loss


@torch.no_grad()
@flexivit.in_eval_mode
def evaluate(model: Oracle, val_set, patch_sizes, device, autocast_dtype=None, batch_size: int = 8) -> dict:
    """The oracle's PQ (the upper bound stage II can reach) at its one patch size, which ``patch_sizes`` must be,
    under the training precision's autocast (``autocast_dtype``; None: float32)."""
    own = (model.patch_size, model.patch_size)
    others = [p for p in patch_sizes if to_2tuple(p) != own]
    if others:
        raise ValueError(f"the stage I oracle runs at its patch size {model.patch_size} only, not {others}")

    def predict(images, semantic, instance, patch):
        with autocast(torch.device(device), autocast_dtype):
            encoded = model.encode(images, semantic, instance, update_dict=False)
            return to_panoptic(model.decode(encoded["quantised"], images))

    results = evaluate_pq(predict, val_set, patch_sizes[:1], device, batch_size)
    return results


def image_forward(model: Oracle):
    """What tools.eval counts and times: the oracle's encode and decode, as its evaluation runs them. They need a
    panoptic target, and their cost does not depend on its values (the one-hot embeddings are dense convolutions),
    so an empty (all void) target stands in for the ground truth. The oracle has one patch size."""

    def forward(images, patch_size=None):
        if patch_size is not None and to_2tuple(patch_size) != (model.patch_size, model.patch_size):
            raise ValueError(f"the stage I oracle runs at its patch size {model.patch_size} only, not {patch_size}")
        void = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long, device=images.device)
        encoded = model.encode(images, void, void, update_dict=False)
        return to_panoptic(model.decode(encoded["quantised"], images))

    return forward


TASK = Task(
    name="panoptic.stage1",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict_refusal=(
        "the stage I oracle encodes the ground-truth panoptic map, so it cannot segment an image alone; "
        "predict with a stage II run (task panoptic.stage2), which carries this oracle inside"
    ),
    image_forward=image_forward,
    export_refusal=(
        "the stage I oracle's forward takes the ground-truth panoptic map besides the image, "
        "so it has no image-only graph to export"
    ),
    flexible=False,
    runlocal="configs/panoptic/scenes.py:stage=1,runlocal",
)
