"""Skip markers for tests that need data or packages this machine may lack: one definition each, with the reason."""

import os
from pathlib import Path

import pytest

from tasks.common.datasets import FASHION_MNIST_ROOT

# The folder the Fashion-MNIST reader itself looks in (tasks/common/datasets.py), and the files it needs there.
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_ROOT))
HAS_FASHION_MNIST = all(
    any((FASHION_MNIST_DIR / f"{split}-{kind}-idx{dims}-ubyte{ext}").exists() for ext in ("", ".gz"))
    for split in ("train", "t10k")
    for kind, dims in (("images", 3), ("labels", 1))
)
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} (install the Debian package "
    "dataset-fashion-mnist, or set FASHION_MNIST_DIR)",
)
