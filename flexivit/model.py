"""FlexiViT: a Vision Transformer whose patch size is chosen at every call (paper Sec. 3, Algorithm 1).

The patch embedding kernel and the position embedding are stored at an *underlying* size (32x32 and 7x7 by
default, Sec. 3.3) and resized in every forward pass to the requested patch size and the resulting token
grid. A plain fixed-patch ViT is the same module with the underlying sizes equal to its one patch size and
grid, so "ViT vs FlexiViT" comparisons run through one code path.

Module and parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.N.attn.qkv``,
...) so that state dicts map onto each other without renaming.

This file is the computation as the paper writes it. Where a CPU computes the same thing faster another way (the
patch embedding as one GEMM, attention written out for bf16 training, GELU and residuals in place without
autograd), the module calls the function of :mod:`flexivit.fast_paths` that does so; each is tested equal to the
plain expression it stands for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_paths
from .pi_resize import Size, bilinear_resize_patch_embed, pi_resize_patch_embed, resize_posemb, to_2tuple

PatchSize = int | Sequence[int]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's names)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if fast_paths.writes_out_attention(q):  # training under bf16 autocast on CPU
            x = fast_paths.written_out_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v: (B, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """The block's two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_paths.takes_no_grad_paths():
            return fast_paths.mlp_no_grad(self, x)  # the same values, GELU applied in place
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D) -> (B, N, hidden) -> (B, N, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for a random subset of samples during training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.rate)
        return x * keep / (1.0 - self.rate)


class Block(nn.Module):
    """Pre-norm Transformer encoder block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        gelu_approximate: str = "tanh",
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio), gelu_approximate=gelu_approximate)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        if fast_paths.takes_no_grad_paths() and not (self.training and self.drop_path.rate > 0):
            return fast_paths.block_no_grad(self, x)  # the same values, in less memory
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FlexiPatchEmbed(nn.Module):
    """Patch embedding with an underlying kernel, resized to the requested patch size on every call.

    ``kernel_resize="pi"`` is the paper's PI-resize (Sec. 3.4); ``"bilinear"`` is the naive resize that
    standard ViTs are evaluated with in Sec. 3.2 / Fig. 4, kept for those comparisons.
    """

    def __init__(self, base_patch_size: Size, in_chans: int, dim: int, kernel_resize: str = "pi"):
        super().__init__()
        if kernel_resize not in ("pi", "bilinear"):
            raise ValueError(f"kernel_resize must be 'pi' or 'bilinear', got {kernel_resize!r}")
        self.base_patch_size = base_patch_size
        self.kernel_resize = kernel_resize
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=base_patch_size, stride=base_patch_size)

    def resized_weight(self, patch_size: Size) -> torch.Tensor:
        resize = pi_resize_patch_embed if self.kernel_resize == "pi" else bilinear_resize_patch_embed
        return resize(self.proj.weight, patch_size)

    def forward(self, images: torch.Tensor, patch_size: Size) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, gh, gw): the strided conv of Algorithm 1 with the kernel resized to ``patch_size``.

        That is ``F.conv2d(images, self.resized_weight(patch_size), self.proj.bias, stride=patch_size)``; a border
        that the patches do not tile is dropped, as the strided conv of the reference does (paper footnote 3;
        big_vision computes patch = image // grid). It is computed as one GEMM over the patches, which is what the
        conv is, and above the underlying size by resizing the patches rather than the kernel (fast_paths).
        """
        return fast_paths.patch_embed(self, images, patch_size)


class FlexiViT(nn.Module):
    """Vision Transformer with a patch size chosen per call.

    Args:
        width, depth, num_heads, mlp_ratio: the Transformer shape.
        base_patch_size: underlying patch embedding kernel size (paper: 32).
        posemb_grid: underlying learned position embedding grid (paper: 7).
        patch_size: the patch size used when a call gives none.
        num_classes: size of the linear head on the pooled feature; 0 for none.
        pool: ``"tok"`` (class token) or ``"gap"`` (mean of the patch tokens after the final norm).
        class_token: whether to prepend a class token (required for ``pool="tok"``).
        gelu_approximate: ``"tanh"`` as in big_vision (flax's default GELU) or ``"none"`` for the exact erf GELU
            that timm uses.
        norm_eps: LayerNorm epsilon; 1e-6 as in flax.
        drop_path_rate: maximum stochastic depth rate, linearly increasing over blocks.
        kernel_resize: ``"pi"`` (paper) or ``"bilinear"`` (naive baseline).
        head_zero_init: zero-initialise the head, as big_vision does for transfer.
    """

    def __init__(
        self,
        *,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        base_patch_size: PatchSize = 32,
        posemb_grid: PatchSize = 7,
        patch_size: PatchSize = 16,
        num_classes: int = 0,
        pool: str = "tok",
        class_token: bool = True,
        qkv_bias: bool = True,
        gelu_approximate: str = "tanh",
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        kernel_resize: str = "pi",
        head_zero_init: bool = True,
    ):
        # The constructor arguments, saved with every checkpoint so that a file alone rebuilds its model.
        self_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.kwargs = self_kwargs
        if pool not in ("tok", "gap"):
            raise ValueError(f"pool must be 'tok' or 'gap', got {pool!r}")
        if pool == "tok" and not class_token:
            raise ValueError("pool='tok' needs class_token=True")
        self.width, self.depth, self.num_classes, self.pool = width, depth, num_classes, pool
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.posemb_grid = to_2tuple(posemb_grid, "posemb_grid")
        self.num_prefix_tokens = int(class_token)
        self.grad_checkpointing = False

        self.patch_embed = FlexiPatchEmbed(
            to_2tuple(base_patch_size, "base_patch_size"), in_chans=in_chans, dim=width, kernel_resize=kernel_resize
        )
        # Stored flat as (1, gh*gw, D), the layout of big_vision and timm checkpoints.
        self.pos_embed = nn.Parameter(torch.empty(1, math.prod(self.posemb_grid), width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        rates = torch.linspace(0, drop_path_rate, steps=depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(
                    width,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    norm_eps=norm_eps,
                    gelu_approximate=gelu_approximate,
                    drop_path=rate,
                )
                for rate in rates
            )
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, num_classes) if num_classes else None
        self._init_weights(head_zero_init)

    def _init_weights(self, head_zero_init: bool) -> None:
        # big_vision's initialisers: lecun-normal patch kernel, normal(1/sqrt(D)) posemb, zero class token,
        # xavier-uniform dense kernels with near-zero biases.
        nn.init.trunc_normal_(
            self.patch_embed.proj.weight, std=1.0 / math.sqrt(self.patch_embed.proj.weight[0].numel())
        )
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=1.0 / math.sqrt(self.width))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.normal_(module.bias, std=1e-6)
        for block in self.blocks:
            # big_vision's query, key and value are three layers (flax MultiHeadDotProductAttention with
            # kernel_init=xavier_uniform, each kernel (D, D) once its heads are flattened): Xavier on each third of
            # the fused weight, bound sqrt(6 / 2D), not on the (3D, D) whole, whose bound sqrt(6 / 4D) would give
            # every projection sqrt(1/2) of the reference's scale.
            for third in block.attn.qkv.weight.data.chunk(3):
                nn.init.xavier_uniform_(third)
        if self.head is not None:
            if head_zero_init:
                nn.init.zeros_(self.head.weight)
            else:
                nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ patch sizes and grids

    def resolve_patch_size(
        self, image_hw: Sequence[int], patch_size: PatchSize | None = None, grid: PatchSize | None = None
    ) -> Size:
        """The (ph, pw) a call uses: ``patch_size``, or ``image // grid`` (big_vision's grid units), or the default."""
        if patch_size is not None and grid is not None:
            raise ValueError("give patch_size or grid, not both")
        if grid is not None:
            gh, gw = to_2tuple(grid, "grid")
            patch = (image_hw[0] // gh, image_hw[1] // gw)
        else:
            patch = self.patch_size if patch_size is None else to_2tuple(patch_size, "patch_size")
        if patch[0] > image_hw[0] or patch[1] > image_hw[1] or min(patch) < 1:
            raise ValueError(
                f"patch size {patch} does not fit the image of size {tuple(image_hw)} (grid {grid}); "
                "patches must be between 1 and the image size"
            )
        return patch

    def posemb_for_grid(self, grid: Size) -> torch.Tensor:
        """The position embedding resized from the stored grid to ``grid``: (1, gh*gw, D)."""
        posemb = self.pos_embed.view(1, *self.posemb_grid, self.width)
        return resize_posemb(posemb, grid).reshape(1, grid[0] * grid[1], self.width)

    # ------------------------------------------------------------------ forward

    def forward_features(
        self,
        images: torch.Tensor,
        patch_size: PatchSize | None = None,
        *,
        grid: PatchSize | None = None,
        return_blocks: bool | Sequence[int] = False,
    ) -> dict:
        """Encode ``images`` (B, C, H, W) at one patch size.

        Returns a dict with ``tokens`` (B, N, D) patch tokens after the final norm, ``grid`` (gh, gw),
        ``patch_size`` (ph, pw), ``pooled`` (B, D), ``cls`` (B, D) when there is a class token, and with
        ``return_blocks`` (True for all, or a list of block indices, negative counting from the end) a list
        ``blocks`` of raw block outputs (B, prefix + N, D), the class token first.
        """
        # Algorithm 1: patchify with the PI-resized kernel, add the resized position embedding, prepend the class
        # token, run the blocks, normalise, pool.
        patch = self.resolve_patch_size(images.shape[-2:], patch_size, grid)
        x = self.patch_embed(images, patch)  # (B, D, gh, gw)
        grid_hw = (x.shape[-2], x.shape[-1])
        # The residual stream is kept in the parameters' dtype: under autocast the patch-embedding GEMM returns
        # bf16 / fp16, but the 2 * depth residual additions accumulate in float32, as in timm (only the matmuls
        # inside the blocks run in low precision; the blocks add their branch outputs back in float32).
        x = x.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)  # (B, N, D)
        # The position embedding is added before the class token is prepended: the class token has none.
        x = x + self.posemb_for_grid(grid_hw)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

        wanted = self._block_indices(return_blocks)
        blocks = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                blocks.append(x)
        x = self.norm(x)

        out = {"tokens": x[:, self.num_prefix_tokens :], "grid": grid_hw, "patch_size": patch}
        if self.cls_token is not None:
            out["cls"] = x[:, 0]
        out["pooled"] = out["cls"] if self.pool == "tok" else out["tokens"].mean(dim=1)
        if return_blocks is not False:
            out["blocks"] = blocks
        return out

    def _block_indices(self, return_blocks: bool | Sequence[int]) -> set[int]:
        if return_blocks is True:
            return set(range(self.depth))
        if return_blocks is False:
            return set()
        if any(not -self.depth <= i < self.depth for i in return_blocks):
            raise ValueError(f"block indices {list(return_blocks)} out of range for depth {self.depth}")
        return {i % self.depth for i in return_blocks}

    def forward_head(self, features: dict) -> torch.Tensor:
        """Logits (B, num_classes) from ``forward_features``' output, or the pooled feature without a head."""
        return features["pooled"] if self.head is None else self.head(features["pooled"])

    def forward(self, images: torch.Tensor, patch_size: PatchSize | None = None, *, grid=None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images, patch_size, grid=grid))

    # ------------------------------------------------------------------ utilities

    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the head (transfer to a new label set); 0 removes it. The constructor arguments follow, so a
        saved checkpoint rebuilds the model with this head."""
        self.num_classes = self.kwargs["num_classes"] = num_classes
        self.head = nn.Linear(self.width, num_classes).to(self.pos_embed.device) if num_classes else None
        if self.head is not None:
            if zero_init:
                nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory for small patch sizes, ~30% more time."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def in_eval_mode(fn):
    """Decorator: ``fn(model, ...)`` runs with ``model`` in eval mode (no dropout, no stochastic depth), and the
    mode it had is put back afterwards, also when ``fn`` raises: evaluation in the middle of training leaves the
    model training."""

    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return run
