"""Independent numpy re-statements of the reference resize semantics, to test our torch operators against.

Written from the documented formulas, not from our code: TF2's ``ResizeBilinear`` with half-pixel centres
(what ``tf.image.resize(..., "bilinear")`` does without antialias) and JAX's ``scale_and_translate`` with a
triangle kernel (what ``jax.image.resize(..., "bilinear")`` does, antialiased by default).
"""

import numpy as np


def tf_bilinear_matrix(old: int, new: int) -> np.ndarray:
    """(new, old) matrix of TF2 half-pixel bilinear resize: in = (i + 0.5) * old / new - 0.5, edges clamped."""
    m = np.zeros((new, old))
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        lo = int(np.floor(x))
        frac = x - lo
        m[i, min(max(lo, 0), old - 1)] += 1 - frac
        m[i, min(max(lo + 1, 0), old - 1)] += frac
    return m


def jax_bilinear_matrix(old: int, new: int, antialias: bool = True) -> np.ndarray:
    """(new, old) matrix of jax.image.resize's bilinear (triangle kernel, widened by the scale when shrinking)."""
    inv_scale = old / new
    kernel_scale = max(inv_scale, 1.0) if antialias else 1.0
    sample = (np.arange(new) + 0.5) * inv_scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(old)[None, :]) / kernel_scale)
    return w / w.sum(axis=1, keepdims=True)


def resize_2d(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply separable matrices to the last two axes of x."""
    return np.einsum("ih,...hw,jw->...ij", rows, x, cols)
