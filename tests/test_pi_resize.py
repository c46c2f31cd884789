"""Property tests of PI-resize and position embedding resize (paper Sec. 3.3-3.4), against the reference resize
semantics restated in tests/reference_resize.py."""

import numpy as np
import pytest
import timm.layers
import torch
import torch.nn.functional as F
from reference_resize import jax_bilinear_matrix, resize_2d, tf_bilinear_matrix

from flexivit.pi_resize import (
    PI_CACHE,
    POSEMB_CACHE,
    bilinear_matrix,
    clear_caches,
    pi_resize_patch_embed,
    resize_posemb,
)

SIZES = [1, 2, 5, 7, 8, 15, 16, 30, 32, 48]


@pytest.mark.parametrize("old,new", [(32, n) for n in SIZES] + [(7, 5), (7, 30), (16, 32), (3, 11)])
def test_bilinear_matrix_is_tf2_half_pixel_bilinear(old, new):
    # Our operator (from F.interpolate) must be the official TF2 operator, stated independently.
    np.testing.assert_allclose(bilinear_matrix(old, new).numpy(), tf_bilinear_matrix(old, new), atol=1e-12)


def test_bilinear_matrix_reproduces_interpolate_in_2d():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False, antialias=False)
    got = bilinear_matrix(32, 12) @ x @ bilinear_matrix(32, 20).T
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("new", [(32, 32), (40, 40), (48, 48), (33, 47), (64, 40)])
def test_upsampling_preserves_tokens_exactly(new):
    # Eq. 3: <resize(x), PI(w)> == <x, w> for every patch x when the patch grows.
    w = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    x = torch.randn(10, 3, 32, 32, dtype=torch.float64)
    x_big = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=False)
    tokens = torch.einsum("bchw,dchw->bd", x, w)
    tokens_big = torch.einsum("bchw,dchw->bd", x_big, pi_resize_patch_embed(w, new))
    torch.testing.assert_close(tokens_big, tokens, rtol=1e-10, atol=1e-10)


def test_32_to_16_is_2x2_sum_pooling():
    w = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(pi_resize_patch_embed(w, 16), F.avg_pool2d(w, 2) * 4, rtol=0, atol=1e-12)


def test_32_to_8_keeps_the_centre_2x2_of_each_4x4_block():
    w = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    centre = w.reshape(4, 3, 8, 4, 8, 4)[:, :, :, 1:3, :, 1:3].sum(dim=(3, 5))
    torch.testing.assert_close(pi_resize_patch_embed(w, 8), centre, rtol=0, atol=1e-12)
    # ...so 75% of the underlying weights do not reach the resized kernel at all.
    grad = torch.autograd.grad(pi_resize_patch_embed(w.requires_grad_(), 8).sum(), w)[0]
    assert (grad != 0).double().mean().item() == pytest.approx(0.25)


def dense_pi_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Eq. 4 as written: P = pinv(B^T) with B the full (new*new, old*old) resize matrix of one-hot images."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    B = F.interpolate(basis, size=new, mode="bilinear", align_corners=False).reshape(old[0] * old[1], -1).T
    return torch.linalg.pinv(B.T)


def test_matches_the_dense_pinv_of_the_paper():
    old, new = (12, 9), (7, 16)
    P = dense_pi_matrix(old, new)
    w = torch.randn(5, 2, *old, dtype=torch.float64)
    want = (P @ w.reshape(10, -1).T).T.reshape(5, 2, *new)
    torch.testing.assert_close(pi_resize_patch_embed(w, new), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("new", [8, 10, 15, 16, 24, 30, 40, 48, (16, 24)])
def test_agrees_with_timm_bilinear_without_antialias(new):
    w = torch.randn(16, 3, 32, 32)
    ours = pi_resize_patch_embed(w, new)
    new2 = (new, new) if isinstance(new, int) else new
    theirs = timm.layers.resample_patch_embed(w, list(new2), interpolation="bilinear", antialias=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_chained_resizes_are_lossy():
    w = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    back = pi_resize_patch_embed(pi_resize_patch_embed(w, 8), 32)
    assert (back - w).abs().max() > 0.1


def test_differentiable_and_keeps_dtype_and_device():
    w = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = pi_resize_patch_embed(w, 12)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 12, 12)
    (out**2).sum().backward()
    # The resize is linear, out = P w per (D, C) slice, so the gradient of sum(out^2) is 2 P^T P w.
    P = dense_pi_matrix((32, 32), (12, 12))
    want = 2 * (P.T @ P @ w.detach().double().reshape(12, -1).T).T.reshape(w.shape)
    torch.testing.assert_close(w.grad.double(), want, rtol=1e-4, atol=1e-5)
    low = w.detach().bfloat16()
    out = pi_resize_patch_embed(low, 12)
    assert out.dtype == torch.bfloat16  # and the values of the float32 resize, to bfloat16's precision
    torch.testing.assert_close(out.float(), pi_resize_patch_embed(low.float(), 12), rtol=1e-2, atol=5e-2)


def test_matrices_computed_once_per_size_pair():
    clear_caches()
    w = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        for p in (8, 16, 24):
            pi_resize_patch_embed(w, p)
            pi_resize_patch_embed(w.double(), p)  # another dtype reuses the float64 matrices
    assert PI_CACHE.computed == 3
    for _ in range(3):
        resize_posemb(torch.randn(1, 7, 7, 8), (10, 10))
    assert POSEMB_CACHE.computed == 1


def test_matrices_computed_once_across_device_moves():
    # A model moved to another device reuses the float64 matrices and only makes a copy on that device. Checked
    # through the cache itself on the "meta" device, which needs no GPU (the resize proper cannot run on meta:
    # torch.autocast has no meta device); with a GPU, also end to end below.
    clear_caches()
    cpu = PI_CACHE.get(((32, 32), (16, 16)), torch.float32, torch.device("cpu"))
    meta = PI_CACHE.get(((32, 32), (16, 16)), torch.float32, torch.device("meta"))
    assert PI_CACHE.computed == 1
    assert all(m.device.type == "meta" and m.shape == c.shape for m, c in zip(meta, cpu, strict=True))
    assert PI_CACHE.get(((32, 32), (16, 16)), torch.float32, torch.device("meta")) is meta  # cached per device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_matrices_computed_once_across_cpu_and_gpu():
    clear_caches()
    w = torch.randn(4, 3, 32, 32)
    for device in ("cpu", "cuda", "cpu", "cuda"):
        pi_resize_patch_embed(w.to(device), 16)
        resize_posemb(torch.randn(1, 7, 7, 8, device=device), 10)
    assert PI_CACHE.computed == 1 and POSEMB_CACHE.computed == 1


@pytest.mark.parametrize("new", [(5, 5), (6, 6), (7, 7), (8, 8), (30, 30), (5, 12), (6, 4)])
def test_posemb_resize_matches_jax_image_resize(new):
    # Antialiased where a side shrinks (only grids 5 and 6 from 7), plain bilinear where it grows.
    pe = torch.randn(1, 7, 7, 16, dtype=torch.float64)
    want = resize_2d(np.moveaxis(pe.numpy(), -1, 1), jax_bilinear_matrix(7, new[0]), jax_bilinear_matrix(7, new[1]))
    got = resize_posemb(pe, new)
    np.testing.assert_allclose(np.moveaxis(got.numpy(), -1, 1), want, atol=1e-12)


def test_posemb_downsampling_differs_from_plain_bilinear():
    # The antialias matters at grid 5: plain bilinear would skip stored rows entirely.
    pe = torch.randn(1, 7, 7, 4, dtype=torch.float64)
    plain = F.interpolate(pe.permute(0, 3, 1, 2), size=(5, 5), mode="bilinear", align_corners=False)
    assert (resize_posemb(pe, 5).permute(0, 3, 1, 2) - plain).abs().max() > 1e-2
