"""Resizing the two patch-size dependent parameters of a ViT (paper Sec. 3.4 and Sec. 3.3).

Both resizes are linear and separable over height and width, so each is written as two small matrices:
``resized = R_h @ x @ R_w^T``. The matrices are computed once per size pair in float64 and cached; every
forward pass then costs two small matmuls in the parameter's own dtype and device.

- Patch embedding kernels use PI-resize (Eq. 4): ``w_new = pinv(B^T) vec(w)`` where ``B`` is the bilinear
  resize operator (half-pixel centres, no antialias, as TF2's ``tf.image.resize(..., "bilinear")`` that the
  official code uses). ``B`` is the Kronecker product of the two 1-D bilinear operators, and the
  pseudo-inverse of a Kronecker product is the Kronecker product of the pseudo-inverses, so the separable
  form is exactly the paper's operator, not an approximation.
- Position embeddings use plain bilinear resize, antialiased on the axes that shrink, which is what
  ``jax.image.resize(..., "bilinear")`` (antialias on by default) does in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Size = tuple[int, int]


def to_2tuple(size: int | Sequence[int], name: str = "size") -> Size:
    """``8 -> (8, 8)``; ``(8, 12) -> (8, 12)``; anything else is an error naming ``name``."""
    if isinstance(size, int | torch.SymInt) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return pair


def bilinear_matrix(old: int, new: int, antialias: bool = False) -> torch.Tensor:
    """The 1-D bilinear resize ``old -> new`` as a float64 matrix of shape (new, old).

    Built by resizing each one-hot basis vector with ``F.interpolate`` (``align_corners=False``, i.e.
    half-pixel centres), so it is by construction the operator that ``F.interpolate`` applies.
    """
    # One (old x 2) image per basis vector. The second axis is left unresized; it has two columns because
    # torch's antialiased kernel returns wrong weights for a size-1 axis (seen on torch 2.14).
    basis = torch.eye(old, dtype=torch.float64)[:, None, :, None].expand(old, 1, old, 2)
    resized = F.interpolate(basis, size=(new, 2), mode="bilinear", align_corners=False, antialias=antialias)
    return resized[:, 0, :, 0].T.contiguous()  # (new, old)


class _MatrixCache:
    """Resize matrices keyed by size pair, computed once in float64, plus per-(dtype, device) copies.

    ``computed`` counts how many times a float64 matrix pair was built; the tests and the benchmark read it
    to prove that a training run with changing patch sizes builds each pair only once.
    """

    def __init__(self, build):
        self._build = build
        self._exact: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = 0

    # torch.compile: a lookup is a constant of the traced graph (its key is static); otherwise dynamo guards on the
    # dict's contents, and the first trace at each size (a cache miss) is followed by a recompilation.
    @torch.compiler.assume_constant_result
    def get(self, key: tuple, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cast_key = (key, dtype, device)
        if cast_key not in self._cast:
            # Built as ordinary tensors even when the first call comes under torch.inference_mode() (an evaluation
            # in Lightning / Hugging Face): an inference tensor in the cache could not be saved for backward by a
            # later training step at the same size.
            with torch.inference_mode(False):
                if key not in self._exact:
                    self._exact[key] = self._build(*key)
                    self.computed += 1
                self._cast[cast_key] = tuple(m.to(dtype=dtype, device=device) for m in self._exact[key])
        return self._cast[cast_key]

    def clear(self) -> None:
        self._exact.clear()
        self._cast.clear()
        self.computed = 0


def _pi_matrices(old: Size, new: Size) -> tuple[torch.Tensor, torch.Tensor]:
    # pinv(B^T) with B = B_h (x) B_w  ==  pinv(B_h^T) (x) pinv(B_w^T): one small pinv per axis, in float64.
    return tuple(torch.linalg.pinv(bilinear_matrix(o, n).T) for o, n in zip(old, new, strict=True))


def _posemb_matrices(old: Size, new: Size) -> tuple[torch.Tensor, torch.Tensor]:
    # Antialias per axis, only where that axis shrinks (jax.image.resize's behaviour); it changes nothing
    # on an axis that grows, but keep the plain operator there to make that obvious.
    return tuple(bilinear_matrix(o, n, antialias=n < o) for o, n in zip(old, new, strict=True))


PI_CACHE = _MatrixCache(_pi_matrices)
POSEMB_CACHE = _MatrixCache(_posemb_matrices)


def _apply_separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h_dim: int) -> torch.Tensor:
    """Apply ``rows`` along dim ``h_dim`` and ``cols`` along dim ``h_dim + 1`` of ``x``."""
    # Keep the resize in the parameter's dtype even under autocast: a bf16 resize matrix would cost accuracy
    # for no speed (the matmuls are tiny) and would differ from the float32 reference.
    with torch.autocast(x.device.type, enabled=False):
        x = torch.movedim(x, (h_dim, h_dim + 1), (-2, -1))
        x = rows @ x @ cols.T
        return torch.movedim(x, (-2, -1), (h_dim, h_dim + 1))


def pi_resize_patch_embed(weight: torch.Tensor, new_size: int | Sequence[int]) -> torch.Tensor:
    """PI-resize a patch embedding kernel (D, C, h, w) -> (D, C, *new_size) (paper Eq. 4).

    Exact inverse of bilinear resize when upsampling (tokens are preserved: ``<resize(x), PI(w)> == <x, w>``);
    the least-squares solution for Gaussian patches when downsampling. Differentiable w.r.t. ``weight``.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a (D, C, h, w) kernel, got shape {tuple(weight.shape)}")
    old, new = tuple(weight.shape[-2:]), to_2tuple(new_size, "new_size")
    if old == new:
        return weight
    rows, cols = PI_CACHE.get((old, new), weight.dtype, weight.device)
    return _apply_separable(weight, rows, cols, h_dim=2)


def bilinear_resize_patch_embed(weight: torch.Tensor, new_size: int | Sequence[int]) -> torch.Tensor:
    """Plain bilinear resize of a kernel, the naive alternative of paper Sec. 3.2 / Fig. 4 (not token-preserving)."""
    new = to_2tuple(new_size, "new_size")
    if tuple(weight.shape[-2:]) == new:
        return weight
    return F.interpolate(weight, size=new, mode="bilinear", align_corners=False, antialias=False)


def resize_posemb(posemb: torch.Tensor, new_grid: int | Sequence[int]) -> torch.Tensor:
    """Resize a position embedding grid (..., gh, gw, D) -> (..., *new_grid, D) (paper Sec. 3.3).

    Bilinear with half-pixel centres; antialiased on an axis that shrinks (this only matters for grids
    smaller than the stored one, e.g. 5 and 6 from 7). Always call it on the stored grid, never on an
    already resized one: resizes do not compose.
    """
    if posemb.ndim < 3:
        raise ValueError(f"expected a (..., gh, gw, D) position embedding, got shape {tuple(posemb.shape)}")
    old, new = tuple(posemb.shape[-3:-1]), to_2tuple(new_grid, "new_grid")
    if old == new:
        return posemb
    rows, cols = POSEMB_CACHE.get((old, new), posemb.dtype, posemb.device)
    return _apply_separable(posemb, rows, cols, h_dim=posemb.ndim - 3)


def clear_caches() -> None:
    """Forget all cached resize matrices (and reset their counters)."""
    PI_CACHE.clear()
    POSEMB_CACHE.clear()
