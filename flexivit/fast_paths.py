"""The CPU speed paths of the forward pass, kept apart so that :mod:`flexivit.model` reads as Algorithm 1.

Each function computes what a plain expression of the model computes, with less memory traffic or in a cheaper
order of the same sums; the model calls it where the docstring below says it applies, and tests/test_models.py
checks each against its plain expression. The measurements are on the CPUs this project trains and measures on.

- :func:`patch_embed` (always): the strided conv of the patch embedding, ``F.conv2d(images, resized kernel, bias,
  stride=patch)``, computed as one GEMM over the patches. On CPU oneDNN re-packs a new conv weight (the resized kernel
  is new in every call) into fresh memory each time: ~5,000 page faults per call at patch 48 for S, and at patch 8 its
  conv is 2x slower than the GEMM.
- :func:`resizes_patches` (PI-resize, a patch larger than the kernel on both axes, when it needs fewer multiply-adds):
  the patches are resized down to the kernel instead of the kernel up to them; for S at patch 48 this more than
  halves the patch embedding's work.
- :func:`written_out_attention` (autograd on, bf16 / fp16 autocast, CPU; :func:`writes_out_attention`): instead of
  ``F.scaled_dot_product_attention``, whose CPU backward is slow in bf16; a train step is 1.3-2x faster (flexivit_mu
  at batch 128, patch 16..4, AMX CPU; docs/main_job.md).
- :func:`mlp_no_grad` (autograd off): ``fc2(gelu(fc1(x)))`` with GELU in place; the MLP of S/16 at batch 8 is ~15%
  faster.
- :func:`block_no_grad` (autograd off, no stochastic depth): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, the
  residuals added in place and a large batch run in groups; S at batch 8, one thread: patch 8 and 10 forwards ~5%
  faster, patch >= 12 unchanged.

The in-place GELU and residual additions give the plain path's values bit for bit; the GEMM, the resized patches, the
written-out attention and the batch groups change only the floating-point rounding of the same sums.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .pi_resize import PI_CACHE, Size

if TYPE_CHECKING:
    from .model import Block, FlexiPatchEmbed, Mlp

# The largest MLP activation a no-grad block allocates on CPU at once (see block_no_grad).
CPU_ACTIVATION_BYTES = 16 * 2**20

# ---------------------------------------------------------------------------------------------- patch embedding


def patch_embed(embed: FlexiPatchEmbed, images: torch.Tensor, patch_size: Size) -> torch.Tensor:
    """``FlexiPatchEmbed.forward``: (B, C, H, W) -> (B, D, gh, gw), the strided conv computed as one GEMM.

    The conv with stride == kernel is computed as what it is, one GEMM over the non-overlapping patches, rather than
    with F.conv2d: the kernel is a new tensor in every call, and on CPU oneDNN re-packs a new conv weight into freshly
    allocated memory each time (~5,000 page faults per call at patch 48 for S), while at patch 8 its conv is 2x
    slower than the GEMM. Same sums; the FLOP count is that of the conv.
    """
    if images.device.type != "cpu":
        # The reasons above are oneDNN's; on a GPU the plain strided conv (cuDNN, timm's path) with the resized
        # kernel is the computation itself. Not timed here (no GPU yet): tools.gpu_check compares against timm.
        return F.conv2d(images, embed.resized_weight(patch_size), embed.proj.bias, stride=patch_size)
    (ph, pw), (B, C, H, W) = patch_size, images.shape
    gh, gw = H // ph, W // pw  # a border that the patches do not tile is dropped, as by the strided conv
    patches = images[:, :, : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    if resizes_patches(embed, (ph, pw), num_patches=B * gh * gw):
        patches, kernel = _pi_resize_patches(embed, patches), embed.proj.weight.transpose(-1, -2)
    else:
        kernel = embed.resized_weight(patch_size)
    patches = patches.reshape(B * gh * gw, -1)  # (B*N, C*kernel area)
    kernel = kernel.reshape(embed.proj.out_channels, -1)  # (D, C*kernel area)
    if embed.proj.bias is None:
        x = patches @ kernel.T
    else:
        x = torch.addmm(embed.proj.bias, patches, kernel.T)  # (B*N, D)
    # (B, D, gh, gw) as a view of the (B, N, D) result: the caller's flatten + transpose back is free.
    return x.view(B, gh, gw, -1).permute(0, 3, 1, 2)


def resizes_patches(embed: FlexiPatchEmbed, patch: Size, num_patches: int) -> bool:
    """Whether bringing the patches down to the kernel costs fewer multiply-adds than the kernel up to them.

    PI-resize is linear, ``PI(w) = R_h w R_w^T``, so a token ``<x, PI(w)> = <R_h^T x R_w, w>``: above the
    underlying size (patch 40 and 48 from 32) the patches can be resized instead of the kernel. The GEMM then
    runs at the kernel's size (K = C*32*32 instead of C*48*48), which for S at patch 48 more than halves the
    patch embedding's work. Same tokens up to float rounding; counted per input channel.
    """
    (ph, pw), (kh, kw) = patch, embed.proj.weight.shape[-2:]
    if embed.kernel_resize != "pi" or ph < kh or pw < kw or (ph, pw) == (kh, kw):
        return False
    dim = embed.proj.out_channels
    kernel_up = dim * (ph * kh * kw + ph * kw * pw) + num_patches * ph * pw * dim
    patches_down = num_patches * (ph * pw * kw + kw * ph * kh) + num_patches * kh * kw * dim
    return patches_down < kernel_up


def _pi_resize_patches(embed: FlexiPatchEmbed, patches: torch.Tensor) -> torch.Tensor:
    """(..., ph, pw) patches -> (..., kw, kh): ``(R_h^T x R_w)^T``, the transpose keeping both matmuls 2-D GEMMs."""
    rows, cols = PI_CACHE.get(
        (tuple(embed.proj.weight.shape[-2:]), tuple(patches.shape[-2:])), patches.dtype, patches.device
    )
    # In the input's dtype even under autocast, as the kernel resize (flexivit/pi_resize.py).
    with torch.autocast(patches.device.type, enabled=False):
        return (patches @ cols).transpose(-1, -2) @ rows  # (..., ph, kw) -> (..., kw, ph) -> (..., kw, kh)


# ---------------------------------------------------------------------------------------------- attention


def writes_out_attention(q: torch.Tensor) -> bool:
    """Training under bf16 / fp16 autocast on CPU, where :func:`written_out_attention` is the faster one.

    There the fused (flash) kernel's backward is slow, and so is the math kernel's masking overhead; attention
    written out trains 1.3-2x faster per step (flexivit_mu at batch 128, patch 16..4, AMX CPU; docs/main_job.md).
    Inference and fp32 keep the fused kernel, which is the faster one for them.
    """
    return torch.is_grad_enabled() and q.device.type == "cpu" and q.dtype != torch.float32


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` without a mask or dropout, as three plain ops: (B, heads, T, d)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


# ---------------------------------------------------------------------------------------------- without autograd


def takes_no_grad_paths() -> bool:
    """Whether the no-grad paths below apply: outside autograd, and not while torch.export / torch.compile traces
    (the batch split depends on the batch size, which an exported graph keeps dynamic)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def mlp_no_grad(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` without autograd, with GELU applied in place.

    Nothing needs the pre-activation, so one (B, N, 4D) tensor fewer is allocated and written (on CPU, touching
    fresh memory costs page faults; measured: the MLP of S/16 at batch 8 runs ~15% faster). Same values: the
    in-place op is the same kernel (and autocast leaves GELU alone).
    """
    x = mlp.fc1(x)  # (B, N, hidden): the block's largest activation
    return mlp.fc2(torch.ops.aten.gelu_(x, approximate=mlp.act.approximate))


def block_no_grad(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` without autograd and without stochastic depth: residuals added in place, large batches in groups.

    On CPU a batch whose (B, N, 4D) MLP activation would exceed :data:`CPU_ACTIVATION_BYTES` runs in groups of
    images. Every op of a block is per image or per token, so only the GEMMs' rounding can differ. glibc serves
    allocations above 32 MiB with fresh mmap'd pages that must be faulted in on every call; measured on S at batch 8
    (one thread): patch 8 and 10 forwards ~5% faster, patch >= 12 unchanged.
    """
    groups = math.ceil(x.shape[0] * x.shape[1] * block.mlp.fc1.out_features * x.element_size() / CPU_ACTIVATION_BYTES)
    if x.device.type == "cpu" and groups > 1:
        return torch.cat([_residuals_in_place(block, part) for part in x.tensor_split(min(groups, x.shape[0]))])
    return _residuals_in_place(block, x)


def _residuals_in_place(block: Block, x: torch.Tensor) -> torch.Tensor:
    x = _add_residual(x, block.attn(block.norm1(x)))
    return _add_residual(x, block.mlp(block.norm2(x)))


def _add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch`` without autograd, in ``x``'s dtype (the residual stream stays float32 under autocast).

    When the dtypes agree the residual is added into the branch output (a fresh tensor that nothing else holds)
    instead of allocating a third (B, N, D) tensor; bitwise the same, floating-point addition commutes. ``x`` itself
    is never written: the caller may keep it (``return_blocks``).
    """
    return branch.add_(x) if branch.dtype == x.dtype else x + branch


__all__ = [
    "CPU_ACTIVATION_BYTES",
    "block_no_grad",
    "mlp_no_grad",
    "patch_embed",
    "resizes_patches",
    "written_out_attention",
    "writes_out_attention",
]
