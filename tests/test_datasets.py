"""Tests for the classification data layer: tasks/common/datasets.py and tasks/common/transforms.py."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from markers import needs_fashion_mnist
from PIL import Image

from tasks.common import datasets as D
from tasks.common.transforms import eval_transform, train_transform


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """Write ``array`` (uint8) as an IDX file, the way the MNIST files are laid out."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.fixture
def idx_root(tmp_path):
    """A tiny Fashion-MNIST-style folder: 7 train images (gz files), 3 test images (plain files)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (7, 4, 5), dtype=np.uint8), np.array([3, 1, 4, 1, 5, 9, 2], np.uint8)),
        "t10k": (rng.integers(0, 256, (3, 4, 5), dtype=np.uint8), np.array([2, 7, 1], np.uint8)),
    }
    for prefix, (images, labels) in arrays.items():
        gz = ".gz" if prefix == "train" else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{gz}", images, compress=bool(gz))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{gz}", labels, compress=bool(gz))
    return tmp_path, arrays


# --- IDX reader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_returns_exact_values(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    path = tmp_path / "x.idx"
    write_idx(path, array, compress)
    out = D.read_idx(str(path))
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path):
    # Multi-byte types are big-endian in IDX; a reader using native order would scramble these.
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.tobytes())
    assert D.read_idx(str(path)).tolist() == [1, -2, 70000]


def test_read_idx_truncated_names_file(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 5, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated") as info:
        D.read_idx(str(path))
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.arange(1000, dtype=np.uint8) % 251, compress=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError) as info:
        D.read_idx(str(path))
    assert str(path) in str(info.value)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "notidx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(str(path))


def test_fashion_mnist_layout_from_tmp_root(idx_root):
    root, arrays = idx_root
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = D.build_dataset("fashion_mnist", split, root=str(root))
        images, labels = arrays[prefix]
        assert len(ds) == len(labels)
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.mode == "L" and type(label) is int and label == labels[i]
            np.testing.assert_array_equal(np.asarray(image), images[i])
    assert ds.classes[9] == "Ankle boot"


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train[:3]", [0, 1, 2]),
        ("train[3:]", [3, 4, 5, 6]),
        ("train[:50%]", [0, 1, 2, 3]),  # round(3.5) = 4, as Python rounds half to even
        ("train[50%:]", [4, 5, 6]),
        ("train[-2:]", [5, 6]),
        ("train[10%:-10%]", [1, 2, 3, 4, 5]),
        ("train[5:2]", []),
    ],
)
def test_split_slices(idx_root, split, expected):
    root, arrays = idx_root
    images, labels = arrays["train"]
    ds = D.build_dataset("fashion_mnist", split, root=str(root))
    assert len(ds) == len(expected) and ds.classes == D.FASHION_MNIST_CLASSES
    for i, j in enumerate(expected):
        image, label = ds[i]
        assert label == labels[j]
        np.testing.assert_array_equal(np.asarray(image), images[j])
    assert ds.targets.tolist() == labels[expected].tolist()


def test_split_halves_are_disjoint_and_complete(idx_root):
    root, _ = idx_root
    first, second = (D.build_dataset("fashion_mnist", s, root=str(root)) for s in ("train[:50%]", "train[50%:]"))
    assert sorted([*first.indices, *second.indices]) == list(range(7))


@pytest.mark.parametrize("split", ["train[:5O%]", "train[1:2:3]", "train[:150%]", "val[:10]"])
def test_bad_split_slice(idx_root, split):
    root, _ = idx_root
    with pytest.raises(ValueError) as info:
        D.build_dataset("fashion_mnist", split, root=str(root))
    assert split.split("[")[0] in str(info.value) or split in str(info.value) or "150%" in str(info.value)


def test_fashion_mnist_mismatched_files(idx_root):
    root, _ = idx_root
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), compress=False)
    with pytest.raises(ValueError, match="do not match"):
        D.build_dataset("fashion_mnist", "test", root=str(root))


# --- Real datasets shipped on this machine -----------------------------------------------------------


@needs_fashion_mnist
def test_real_fashion_mnist():
    train = D.build_dataset("fashion_mnist", "train")
    test = D.build_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert len(train.classes) == 10 and train.classes[0] == "T-shirt/top"
    assert train.images.shape == (60000, 28, 28)
    assert np.bincount(train.targets, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    image, label = train[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 10


def test_mnist5k_splits():
    train, test, every = (D.build_dataset("mnist5k", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (4000, 1000, 5000)
    # The file is sorted by digit; both splits must still hold every digit, evenly.
    assert np.bincount(train.targets, minlength=10).tolist() == [400] * 10
    assert np.bincount(test.targets, minlength=10).tolist() == [100] * 10
    # The splits are disjoint and together make up the whole file.
    rows = {every.images[i].tobytes() for i in range(len(every))}
    train_rows = {train.images[i].tobytes() for i in range(len(train))}
    test_rows = {test.images[i].tobytes() for i in range(len(test))}
    assert not train_rows & test_rows and train_rows | test_rows == rows
    image, label = train[0]
    assert image.mode == "L" and image.size == (28, 28) and type(label) is int
    assert train.classes == [str(d) for d in range(10)]
    np.testing.assert_array_equal(np.asarray(every[0][0]), every.images[0])


# --- Registry and errors ---------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(KeyError) as info:
        D.build_dataset("cifar11", "train")
    for name in ("cifar10", "fashion_mnist", "mnist5k", "imagefolder"):
        assert name in str(info.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="valid splits: train, test, all"):
        D.build_dataset("mnist5k", "validation")


def test_dataset_info():
    info = D.dataset_info("fashion_mnist")
    assert info["num_classes"] == 10 and info["channels"] == 1 and info["classes"][8] == "Bag"
    assert D.dataset_info("cifar100")["num_classes"] == 100
    info["classes"].append("mutated")  # a caller's edits must not leak into the registry
    assert len(D.dataset_info("fashion_mnist")["classes"]) == 10


def test_cifar10_missing_root_raises_with_path(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        D.build_dataset("cifar10", "train", root=str(root))
    message = str(info.value)
    assert str(root) in message and "cifar-10-batches-py" in message and "download=True" in message


def test_cifar10_incomplete_folder_raises_file_not_found(tmp_path):
    # The folder exists but holds no batches: torchvision's RuntimeError becomes a FileNotFoundError.
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="download=True"):
        D.build_dataset("cifar10", "test", root=str(tmp_path))


def test_torchvision_mnist_from_fake_files(tmp_path):
    # torchvision's MNIST only checks that the unzipped raw files exist, so tiny ones exercise our wiring.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    for prefix, labels in (("train", [5, 0, 4]), ("t10k", [7, 2, 1])):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels), compress=False)
    ds = D.build_dataset("mnist", "test", root=str(tmp_path))
    assert len(ds) == 3 and len(ds.classes) == 10
    image, label = ds[2]
    assert image.mode == "L" and type(label) is int and label == 1
    np.testing.assert_array_equal(np.asarray(image), images[2])


def test_torchvision_pet_split_mapping(tmp_path):
    # Our "train" must read torchvision's "trainval" list, with breed (not cat/dog) labels.
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    for name in ("Abyssinian_1", "beagle_1", "beagle_2"):
        Image.new("RGB", (4, 4)).save(base / "images" / f"{name}.jpg")
    (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 3 2 1\n")
    (base / "annotations" / "test.txt").write_text("beagle_2 3 2 1\n")
    train = D.build_dataset("oxford_iiit_pet", "train", root=str(tmp_path))
    assert len(train) == 2 and [label for _, label in train] == [0, 2]
    assert len(D.build_dataset("oxford_iiit_pet", "test", root=str(tmp_path))) == 1


def test_torchvision_dataset_needs_root():
    with pytest.raises(ValueError, match="root"):
        D.build_dataset("food101", "train")


# --- imagefolder -------------------------------------------------------------------------------------


def make_folder(root, split="train"):
    for name, value in (("cat", 10), ("dog", 200)):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6, 5), (value, value, i)).save(folder / f"{i}.png")


def test_imagefolder_labels(tmp_path):
    make_folder(tmp_path)
    ds = D.build_dataset("imagefolder", "train", root=str(tmp_path))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (6, 5)
        assert label == (0 if image.getpixel((0, 0))[0] == 10 else 1)
    assert sorted(label for _, label in ds) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_corrupt_image_names_path(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = D.build_dataset("imagefolder", "train", root=str(tmp_path))
    index = ds.samples.index((str(bad), 1))
    with pytest.raises(ValueError, match="cannot read image") as info:
        ds[index]
    assert str(bad) in str(info.value)


def test_imagefolder_missing_split(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        D.build_dataset("imagefolder", "val", root=str(tmp_path))
    assert str(tmp_path / "val") in str(info.value)


# --- Subsets ---------------------------------------------------------------------------------------


def toy_dataset(n_per_class=4, classes=5):
    labels = np.repeat(np.arange(classes), n_per_class)
    images = np.stack([np.full((2, 2), i, np.uint8) for i in range(len(labels))])  # pixel = item index
    return D.ArrayDataset(images, labels, [f"c{k}" for k in range(classes)])


def test_class_subset_relabels():
    ds = toy_dataset()
    sub = D.class_subset(ds, [3, 1])
    assert len(sub) == 8 and sub.classes == ["c3", "c1"]
    for i in range(len(sub)):
        image, label = sub[i]
        original = int(np.asarray(image)[0, 0])
        assert ds.targets[original] in (1, 3)
        assert label == {3: 0, 1: 1}[int(ds.targets[original])]
    assert sub.targets.tolist() == [sub[i][1] for i in range(len(sub))]


def test_class_subset_without_relabel_keeps_labels():
    sub = D.class_subset(toy_dataset(), [4, 2], relabel=False)
    assert sorted({label for _, label in sub}) == [2, 4] and len(sub.classes) == 5


def test_class_subset_rejects_bad_classes():
    with pytest.raises(ValueError):
        D.class_subset(toy_dataset(), [5])
    with pytest.raises(ValueError):
        D.class_subset(toy_dataset(), [1, 1])


def test_take_is_deterministic_and_distinct():
    ds = toy_dataset()
    a, b, c = D.take(ds, 7, seed=1), D.take(ds, 7, seed=1), D.take(ds, 7, seed=2)
    assert len(a) == 7 and a.indices.tolist() == b.indices.tolist() != c.indices.tolist()
    assert len(set(a.indices.tolist())) == 7
    for i in range(len(a)):
        image, label = a[i]
        assert label == ds.targets[int(np.asarray(image)[0, 0])]
    # Subsets compose: take then class_subset reads labels from the subset's .targets.
    sub = D.class_subset(a, [0])
    assert all(label == 0 for _, label in sub) and len(sub) == int((a.targets == 0).sum())


# --- Transforms ------------------------------------------------------------------------------------


def test_train_transform_shape_and_range():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    t, plain = train_transform(16, randaugment=True), train_transform(16, randaugment=False)
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = t(image)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 16, 16)
        assert out.min() >= -1.0 and out.max() <= 1.0
        # The same seed draws the same crop and flip first, so RandAugment's two ops are all that differs.
        torch.manual_seed(seed)
        changed += not torch.equal(plain(image), out)
    assert changed >= 5  # RandAugment applied (an op can be the identity or leave a random image unchanged)


def test_train_transform_maps_black_and_white_to_range_ends():
    # crop_scale=(1, 1) on a 4:3 image keeps it whole, so black and white pixels survive the resize:
    # they must land exactly on -1 and +1 (a missing or doubled normalisation would not).
    array = np.zeros((30, 40), np.uint8)
    array[:, 20:] = 255
    t = train_transform(20, crop_scale=(1.0, 1.0), hflip=False)
    out = t(Image.fromarray(array))
    assert out.shape == (3, 20, 20)
    assert out[:, :, :9].eq(-1.0).all() and out[:, :, 11:].eq(1.0).all()


def test_gray_input_becomes_three_channels():
    gray = Image.new("L", (28, 28), 51)
    out = eval_transform(8, crop_ratio=1.0)(gray)
    assert out.shape == (3, 8, 8)
    # 51/255 = 0.2 in [0, 1] -> 2 * 0.2 - 1 = -0.6 in [-1, 1]
    torch.testing.assert_close(out, torch.full((3, 8, 8), -0.6), atol=1e-6, rtol=0)
    out1 = train_transform(8, channels=1, value_range=(0, 1))(gray)
    torch.testing.assert_close(out1, torch.full((1, 8, 8), 0.2), atol=1e-6, rtol=0)


def test_imagenet_normalisation_of_constant_colour():
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    out = eval_transform(24, value_range="imagenet")(image)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert out.shape == (3, 24, 24)
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((24, 24), expected[c]), atol=1e-5, rtol=0)


def test_eval_transform_centre_crop_geometry():
    # Left half black, right half white, 64x32: resize short side to 16/0.5 = 32 (no-op) then crop 16x16
    # from the centre, which straddles the edge: left 8 columns black, right 8 white.
    array = np.zeros((32, 64), np.uint8)
    array[:, 32:] = 255
    out = eval_transform(16, crop_ratio=0.5, value_range=(0, 1))(Image.fromarray(array))
    assert out.shape == (3, 16, 16)
    assert out[:, :, :8].max() == 0.0 and out[:, :, 8:].min() == 1.0
    # A white stripe in the leftmost 16 columns is outside that crop, but survives a straight resize
    # (64 -> 16 columns: the first 4 stay white).
    array = np.zeros((32, 64), np.uint8)
    array[:, :16] = 255
    cropped = eval_transform(16, crop_ratio=0.5, value_range=(0, 1))(Image.fromarray(array))
    squashed = eval_transform(16, crop_ratio=1.0, value_range=(0, 1))(Image.fromarray(array))
    assert cropped.max() == 0.0
    assert squashed.shape == (3, 16, 16)
    assert squashed[:, :, :3].min() == 1.0 and squashed[:, :, 5:].max() == 0.0


def test_transform_with_dataset_end_to_end():
    ds = D.build_dataset("mnist5k", "test", transform=eval_transform(32, crop_ratio=1.0))
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and label == 0  # the file is sorted by digit
    # The stored 28x28 digit, resized by half-pixel bilinear in float and mapped to [-1, 1], on all three channels;
    # torchvision resizes uint8 in fixed point, so allow one grey level.
    raw = torch.from_numpy(ds.images[0]).double()[None, None]
    want = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)[0] / 255 * 2 - 1
    torch.testing.assert_close(image.double(), want.expand(3, -1, -1), rtol=0, atol=1.01 * 2 / 255)
    assert image.min() == -1.0 and image.max() > 0.9  # black background, bright strokes


def test_bad_transform_arguments():
    with pytest.raises(ValueError):
        train_transform(16, value_range="imagenet", channels=1)
    with pytest.raises(ValueError):
        eval_transform(16, crop_ratio=0.0)
    with pytest.raises(ValueError):
        eval_transform(16, value_range=(1, 1))
