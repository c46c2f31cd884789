"""Bad inputs to the tools (deploy, export, predict, eval, analyze, demo, make_scenes), the demo's API, the image opener
and the data readers: each is refused with one message that names the culprit (flag, key, file or value).

The CLI and demo cases are tables; one parametrized test runs each table. Tools run in-process (``main(argv)``) and
their ``SystemExit`` is caught: exit status 2 is argparse's usage error (message on stderr), 1 a ``SystemExit``
whose message is the one line the user sees.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from markers import HAS_FASHION_MNIST, needs_fashion_mnist
from PIL import Image

import flexivit
from tasks.common import datasets as D
from tasks.common.config import load_config
from tasks.common.images import ImageError, open_image
from tools import analyze, demo, deploy, export, make_scenes, predict, train
from tools import eval as eval_tool

CONFIG = "configs/classification/fashion_mnist.py:runlocal"  # 24 px images, patch sizes 12 8 6, width 32


def png_bytes(side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def demo_entry(argv):
    """tools.demo up to serving: its arguments and its model (``main`` would then serve forever)."""
    args = demo.parse_args(argv)
    return demo.DemoModel(args.workdir, args.config, args.set, args.patch_sizes)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A tiny trained workdir, copies of it with a damaged config.json / choice.json / empty eval.patch_sizes, a
    checkpoint of another width, and folders of bad images: the ``{name}`` placeholders of the CLI table."""
    if not HAS_FASHION_MNIST:
        pytest.skip("Fashion-MNIST IDX files not found (see tests/markers.py)")
    root = tmp_path_factory.mktemp("bad_inputs")
    workdir = root / "run"
    train.main(["--config", CONFIG, "--workdir", str(workdir), "--set", "train.steps=2", "eval.final=False"])
    broken, no_sizes, bad_choice = root / "broken", root / "no_sizes", root / "bad_choice"
    for copy in (broken, no_sizes, bad_choice):
        shutil.copytree(workdir, copy)
    (broken / "config.json").write_text('{"task": "classification", "model": {')  # cut off mid-write
    config = json.loads((no_sizes / "config.json").read_text())
    config["eval"]["patch_sizes"] = []
    (no_sizes / "config.json").write_text(json.dumps(config))
    (bad_choice / "deploy").mkdir()
    (bad_choice / "deploy" / "choice.json").write_text("not json")
    other = root / "headless.safetensors"  # a backbone without a class head: not a classifier
    model = flexivit.create_model("flexivit_mu", depth=1, width=48, num_heads=2, base_patch_size=16, posemb_grid=7,
                                  num_classes=0)  # fmt: skip
    flexivit.save_model(model, other)
    (root / "empty").mkdir()
    (root / "bad_images").mkdir()
    (root / "bad_images" / "notes.png").write_text("a text file with an image's name")
    (root / "bad_images" / "cut.png").write_bytes(png_bytes()[:200])
    (root / "out_folder").mkdir()
    names = dict(run=workdir, broken=broken, no_sizes=no_sizes, bad_choice=bad_choice, other=other, root=root)
    return {key: str(value) for key, value in names.items()}


# ---------------------------------------------------------------------------------------------- the CLI table

W = ["--workdir", "{run}"]
MISSING = ["--workdir", "{root}/no_such_run"]  # usage errors must be caught before the workdir is even read
CLI_CASES = [
    # (id, entry point, argv, exit status, substrings of the message)
    ("deploy-repeats-0", deploy.main, [*MISSING, "--budget-ms", "5", "--repeats", "0"], 2, ["--repeats", "'0'"]),
    ("deploy-batch-negative", deploy.main, [*MISSING, "--budget-ms", "5", "--batch", "-1"], 2, ["--batch"]),
    ("deploy-budget-zero", deploy.main, [*MISSING, "--budget-ms", "0"], 2, ["--budget-ms", "> 0"]),
    ("deploy-budget-nan", deploy.main, [*MISSING, "--budget-ms", "nan"], 2, ["--budget-ms", "finite"]),
    ("deploy-gflops-negative", deploy.main, [*MISSING, "--budget-gflops", "-1"], 2, ["--budget-gflops"]),
    ("deploy-min-metric-inf", deploy.main, [*MISSING, "--min-metric", "inf"], 2, ["--min-metric"]),
    ("deploy-patch-0", deploy.main, [*MISSING, "--budget-ms", "5", "--patch-sizes", "8", "0"], 2, ["--patch-sizes"]),
    ("scenes-num-train", make_scenes.main, ["--out", "{root}/s", "--num-train", "-3", "--num-val", "2"], 2,
     ["--num-train", "'-3'"]),
    ("scenes-num-val", make_scenes.main, ["--out", "{root}/s", "--num-train", "2", "--num-val", "0"], 2,
     ["--num-val"]),
    ("scenes-items-order", make_scenes.main, ["--out", "{root}/s", "--num-train", "1", "--num-val", "1",
     "--items", "5", "2"], 2, ["--items", "MIN is larger"]),
    ("scenes-item-size", make_scenes.main, ["--out", "{root}/s", "--num-train", "1", "--num-val", "1",
     "--item-size", "0.5", "1.5"], 2, ["--item-size", "<= 1"]),
    ("scenes-size-0", make_scenes.main, ["--out", "{root}/s", "--num-train", "1", "--num-val", "1", "--size", "0"],
     2, ["--size"]),
    ("analyze-batch-small", analyze.main, [*MISSING, "--batch", "2"], 2, ["--batch", ">= 4", "minibatch CKA"]),
    ("analyze-num-images", analyze.main, [*MISSING, "--num-images", "3"], 2, ["--num-images", "at least 4"]),
    ("analyze-patch-0", analyze.main, [*MISSING, "--patch-sizes", "0"], 2, ["--patch-sizes"]),
    ("analyze-ensemble-0", analyze.main, [*MISSING, "--max-ensemble", "0"], 2, ["--max-ensemble"]),
    ("predict-patch-0", predict.main, [*MISSING, "--patch-size", "0", "x.png"], 2, ["--patch-size"]),
    ("predict-topk-0", predict.main, [*MISSING, "--patch-size", "8", "--topk", "0", "x.png"], 2, ["--topk"]),
    ("predict-batch-0", predict.main, [*MISSING, "--patch-size", "8", "--batch", "0", "x.png"], 2, ["--batch"]),
    ("predict-budget-negative", predict.main, [*MISSING, "--budget-ms", "-5", "x.png"], 2, ["--budget-ms"]),
    ("export-patch-negative", export.main, [*MISSING, "--patch-size", "-8", "--format", "onnx", "--out", "m.onnx"],
     2, ["--patch-size"]),
    ("export-atol-negative", export.main, [*MISSING, "--patch-size", "8", "--format", "onnx", "--out", "m.onnx",
     "--atol", "-1"], 2, ["--atol"]),
    ("export-out-folder", export.main, [*MISSING, "--patch-size", "8", "--format", "onnx", "--out",
     "{root}/out_folder"], 2, ["--out", "out_folder", "is a folder"]),
    ("eval-timing-batch-0", eval_tool.main, [*MISSING, "--timing-batch", "0"], 2, ["--timing-batch"]),
    ("eval-patch-negative", eval_tool.main, [*MISSING, "--patch-sizes", "8", "-4"], 2, ["--patch-sizes", "'-4'"]),
    ("demo-patch-0", demo_entry, [*MISSING, "--patch-sizes", "8", "0"], 2, ["--patch-sizes"]),
    ("demo-port-negative", demo_entry, [*MISSING, "--port", "-1"], 2, ["--port"]),
    # Checked against the workdir: exit status 1 and one line.
    ("export-patch-too-large", export.main, [*W, "--patch-size", "64", "--format", "onnx", "--out", "{root}/m.onnx"],
     1, ["--patch-size", "64", "24x24"]),
    ("export-image-size-small", export.main, [*W, "--patch-size", "16", "--image-size", "12", "--format", "timm",
     "--out", "{root}/m.safetensors"], 1, ["patch size 16", "12x12"]),
    ("eval-patch-too-large", eval_tool.main, [*W, "--patch-sizes", "8", "32", "--no-timing"], 1, ["32", "24x24"]),
    ("deploy-patch-too-large", deploy.main, [*W, "--patch-sizes", "48", "--budget-ms", "5"], 1, ["48", "24x24"]),
    ("predict-patch-too-large", predict.main, [*W, "--patch-size", "30", "{root}/bad_images"], 1, ["30", "24x24"]),
    ("analyze-block", analyze.main, [*W, "--what", "similarity", "--block", "5", "--out", "{root}/a"], 1,
     ["--block 5", "0..0"]),
    ("analyze-cka-one-size", analyze.main, [*W, "--what", "cka", "--patch-sizes", "8", "--out", "{root}/a"], 1,
     ["cka", "at least two"]),
    ("analyze-bad-image", analyze.main, [*W, "--what", "attention", "--images", "{root}/bad_images/notes.png",
     "--out", "{root}/a"], 1, ["--images", "notes.png", "not an image"]),
    ("predict-no-images", predict.main, [*W, "--patch-size", "8", "{root}/empty"], 1, ["no image files", "empty"]),
    ("predict-all-skipped", predict.main, [*W, "--patch-size", "8", "{root}/bad_images"], 1,
     ["none of the 2", "nothing was predicted"]),
    ("predict-bad-choice", predict.main, ["--workdir", "{bad_choice}", "--budget-ms", "5", "{root}/bad_images"], 1,
     ["choice.json", "damaged", "tools.deploy"]),
    ("eval-no-workdir", eval_tool.main, [*MISSING], 1, ["no_such_run: no such workdir"]),
    ("eval-unknown-set-key", eval_tool.main, [*W, "--set", "train.stepz=3"], 1, ["--set", "stepz"]),
    ("eval-no-checkpoint-file", eval_tool.main, ["--checkpoint", "{root}/nope.pt", "--config", CONFIG], 1,
     ["nope.pt: no such workdir or checkpoint file"]),
    ("eval-not-a-workdir", eval_tool.main, ["--workdir", "{root}/empty"], 1,
     ["empty has no checkpoint under checkpoints/: is it a training workdir?"]),
    ("eval-empty-patch-sizes", eval_tool.main, ["--workdir", "{no_sizes}", "--no-timing"], 1,
     ["eval.patch_sizes of no_sizes's config is empty", "--patch-sizes"]),
    ("eval-another-tasks-checkpoint", eval_tool.main, ["--checkpoint", "{other}", "--config", CONFIG, "--no-timing"],
     1, ["headless.safetensors is not a classification checkpoint", "another task's"]),
    *[
        (f"{name}-corrupt-config", entry, ["--workdir", "{broken}", *rest], 1,
         ["broken/config.json", "is not a readable JSON config", "--config"])
        for name, entry, rest in [
            ("eval", eval_tool.main, []),
            ("deploy", deploy.main, ["--budget-ms", "5"]),
            ("predict", predict.main, ["--patch-size", "8", "{root}/bad_images"]),
            ("export", export.main, ["--patch-size", "8", "--format", "timm", "--out", "{root}/m.safetensors"]),
            ("analyze", analyze.main, []),
            ("demo", demo_entry, []),
        ]
    ],
]  # fmt: skip


def _exit_of(error: SystemExit, capsys) -> tuple[int, str]:
    """``(exit status, message)`` as a shell would see them."""
    if isinstance(error.code, str):
        return 1, error.code
    return error.code or 0, capsys.readouterr().err


@needs_fashion_mnist
@pytest.mark.parametrize(
    ("entry", "argv", "status", "names"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_bad_input_exits_naming_the_culprit(paths, entry, argv, status, names, capsys):
    argv = [arg.format(**paths) for arg in argv]
    with pytest.raises(SystemExit) as info:
        entry(argv)
    got, message = _exit_of(info.value, capsys)
    assert got == status, message
    for name in names:
        assert name in message, (name, message)
    if status == 1:
        assert "\n" not in message.strip()  # one line, not a traceback or a list


# ---------------------------------------------------------------------------------------------- the demo's API


def _upload(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


# Image.MAX_IMAGE_PIXELS is lowered to 3000 for these requests: a 64x64 PNG (4096 px) is between one and two times
# the limit, where PIL only warns; a 128x128 one (16384 px) is past twice the limit, where PIL raises.
DEMO_CASES = [
    # (id, request keyword arguments for client.post, HTTP status, substrings of the error)
    ("patch-float", dict(json={"example": 0, "patch_size": 8.9}), 400, ["8.9", "[12, 8, 6]"]),
    ("patch-bool", dict(json={"example": 0, "patch_size": True}), 400, ["True"]),
    ("patch-string", dict(json={"example": 0, "patch_size": "8"}), 400, ["'8'"]),
    ("patch-missing", dict(json={"example": 0}), 400, ["patch_size is missing"]),
    ("body-list", dict(json=[8]), 400, ["JSON object"]),
    ("body-not-json", dict(data=b"patch=8", content_type="application/json"), 400, ["JSON object"]),
    ("unknown-field", dict(json={"patch_size": 8, "pach": 1}), 400, ["unknown field", "pach"]),
    ("example-string", dict(json={"patch_size": 8, "example": "1"}), 400, ["example '1'"]),
    ("example-and-image", dict(json={"patch_size": 8, "example": 0, "image": "x"}), 400, ["either"]),
    ("image-not-string", dict(json={"patch_size": 8, "image": 5}), 400, ["image must be"]),
    ("image-not-base64", dict(json={"patch_size": 8, "image": "data:image/png;base64,@@@"}), 400, ["base64"]),
    ("image-text", dict(json={"patch_size": 8, "image": _upload(b"hello")}), 400, ["upload", "not an image"]),
    ("image-truncated", dict(json={"patch_size": 8, "image": _upload(png_bytes(40)[:300])}), 400,
     ["upload", "truncated"]),
    ("image-bomb-warning", dict(json={"patch_size": 8, "image": _upload(png_bytes(64))}), 400,
     ["upload", "decompression bomb"]),
    ("image-bomb-error", dict(json={"patch_size": 8, "image": _upload(png_bytes(128))}), 400,
     ["upload", "decompression bomb"]),
    ("too-large", dict(json={"patch_size": 8, "image": "A" * (demo.MAX_UPLOAD_BYTES + 1)}), 413, ["20 MiB"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def client(paths):
    return demo.create_app(demo.DemoModel(paths["run"])).test_client()


@needs_fashion_mnist
@pytest.mark.parametrize(("request_kwargs", "status", "names"), [c[1:] for c in DEMO_CASES],
                         ids=[c[0] for c in DEMO_CASES])  # fmt: skip
def test_demo_bad_request_is_a_json_4xx_naming_the_culprit(client, request_kwargs, status, names, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    response = client.post("/api/predict", **request_kwargs)
    assert response.status_code == status and response.is_json, response.data[:200]
    error = response.get_json()["error"]
    for name in names:
        assert name in error, (name, error)


@needs_fashion_mnist
def test_demo_other_http_errors_are_json_too(client):
    response = client.get("/api/nothing-here")
    assert response.status_code == 404 and "error" in response.get_json()


# ---------------------------------------------------------------------------------------------- the image opener


@pytest.mark.parametrize(("side", "limit"), [(64, 3000), (128, 3000)], ids=["warning-range", "error-range"])
def test_open_image_refuses_a_decompression_bomb(tmp_path, monkeypatch, side, limit):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # a small image stands for a huge one
    with pytest.raises(ImageError, match="decompression bomb") as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [(png_bytes()[:300], "truncated or corrupt"), (b"just text", "not an image"), (b"", "not an image")],
    ids=["truncated-png", "text-named-png", "empty"],
)
def test_open_image_names_the_file_and_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=words) as info:
        open_image(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ImageError, match=f"cannot read image {tmp_path / 'absent.png'}: No such file"):
        open_image(tmp_path / "absent.png")


@needs_fashion_mnist
def test_predict_skips_bombs_and_corrupt_files_and_predicts_the_rest(paths, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    shutil.copytree(Path(paths["root"]) / "bad_images", folder)
    (folder / "good.png").write_bytes(png_bytes(40))  # 1600 px: under the lowered limit
    (folder / "bomb.png").write_bytes(png_bytes(64))  # 4096 px: PIL alone would only warn and predict it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    result = predict.main(["--workdir", paths["run"], "--patch-size", "8", str(folder)])
    assert list(result["results"]) == [str(folder / "good.png")]
    assert sorted(result["skipped"]) == sorted(str(folder / n) for n in ("bomb.png", "cut.png", "notes.png"))
    out = capsys.readouterr()
    assert "1 image(s) predicted at patch 8, 3 skipped" in out.out and "decompression bomb" in out.out


# ---------------------------------------------------------------------------------------------- data readers


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_label_out_of_range_names_example_label_and_class_count(tmp_path):
    labels = np.array([0, 9, 3, 12, 1, 200], np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((6, 4, 4), np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError, match=r"fashion_mnist split 'train': example 3 has label 12, outside the 10 "
                       r"classes \[0, 10\) \(2 of 6 labels"):  # fmt: skip
        D.build_dataset("fashion_mnist", "train[:50%]", root=str(tmp_path))


def test_csv_label_out_of_range_is_refused(tmp_path):
    table = np.zeros((3, 785), np.int64)
    table[:, -1] = [4, 10, 2]
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match=r"example 1 has label 10, outside the 10 classes"):
        D.build_dataset("mnist5k", "all", root=str(tmp_path))


def _classification_data(root: Path, val_split: str):
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / name / "0.png")
    data = load_config(CONFIG).data
    data.update(name="imagefolder", root=str(root), train_split="train", val_split=val_split, train_examples=None,
                val_examples=None)  # fmt: skip
    return data


def test_empty_classification_validation_split_is_refused_by_name(tmp_path):
    from tasks import classification

    with pytest.raises(ValueError, match=r"data.val_split='train\[100%:\]' of imagefolder has no examples"):
        classification.build_datasets(_classification_data(tmp_path, "train[100%:]"))


def _segmentation_folder(root: Path, mask_value: int, n: int = 1) -> None:
    for folder in ("images/train", "annotations/train", "images/val", "annotations/val"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (6, 6)).save(root / "images" / "train" / f"{i}.jpg")
        mask = np.zeros((6, 6), np.uint8)
        mask[2, 3] = mask_value
        Image.fromarray(mask).save(root / "annotations" / "train" / f"{i}.png")


def test_segmentation_mask_class_out_of_range_names_the_mask(tmp_path):
    from tasks.segmentation.data import build_segmentation_dataset

    _segmentation_folder(tmp_path, mask_value=7)
    dataset = build_segmentation_dataset("folder", "train", tmp_path, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"0\.png holds class id 7 .* outside the 3 classes \[0, 3\)"):
        dataset[0]
    _segmentation_folder(tmp_path / "ok", mask_value=255)  # the ignore index is no class: accepted
    image, mask = build_segmentation_dataset("folder", "train", tmp_path / "ok", classes=["a", "b", "c"])[0]
    assert mask.max() == 255 and image.size == (6, 6)


def test_empty_segmentation_split_is_refused_by_name(tmp_path):
    from tasks.segmentation.data import build_segmentation_dataset

    _segmentation_folder(tmp_path, mask_value=1)
    with pytest.raises(ValueError, match=r"folder split 'val' in .* has no examples"):
        build_segmentation_dataset("folder", "val", tmp_path, classes=["a", "b"])


def test_empty_contrastive_validation_split_is_refused_by_name(tmp_path):
    from tasks import contrastive

    (tmp_path / "train.csv").write_text("image,caption\na.png,a photo\nb.png,another photo\n")
    (tmp_path / "val.csv").write_text("image,caption\n")
    data = load_config("configs/contrastive/fashion_mnist.py:runlocal").data
    data.update(name="pairs", root=str(tmp_path), train_split=str(tmp_path / "train.csv"),
                val_split=str(tmp_path / "val.csv"), zeroshot=None, train_examples=None, val_examples=None)  # fmt: skip
    with pytest.raises(ValueError, match=r"data.val_split='.*val.csv' of pairs has no examples"):
        contrastive.build_datasets(data)


def test_fixed_size_export_refuses_a_patch_larger_than_the_image():
    from tasks import get_task
    from tools.lib.export import FixedSizeModel

    model = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"patch size \(64, 64\) is larger than the image size \(48, 48\)"):
        FixedSizeModel(get_task("classification"), model, 64, 48)
