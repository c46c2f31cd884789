"""tools.predict on every task of tasks.TASKS: a tiny trained run per task, two user images of different sizes, the
datasets out of reach.

The tool must give what the task's own ``predict`` gives (same records, same pictures), write them where it says,
refuse an option the task does not take by name, and pass on a task's refusal. ``tiny_run`` is shared with
tests/test_demo.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks
from tasks.common.images import open_image
from tools import predict, train

# Each task's smoke config: ``(config, --set overrides)``; "{name}" is the workdir of that task's tiny run (stage II
# carries a trained stage I oracle inside).
RUNLOCAL = {
    "classification": ("configs/classification/fashion_mnist.py:runlocal", []),
    "contrastive": ("configs/contrastive/fashion_mnist.py:runlocal", []),
    "segmentation": ("configs/segmentation/scenes.py:runlocal", []),
    "detection": ("configs/detection/scenes.py:runlocal", []),
    "panoptic.stage1": ("configs/panoptic/scenes.py:stage=1,runlocal", []),
    "panoptic.stage2": ("configs/panoptic/scenes.py:stage=2,runlocal", ["model.oracle={panoptic.stage1}"]),
}
# A value for every option tools.predict offers: passed to the tasks that take it.
OPTION_VALUES = {"topk": ["--topk", "2"], "queries": ["--queries", "a bag", "a shoe"],
                 "score_threshold": ["--score-threshold", "0.0"], "nms_iou": ["--nms-iou", "0.5"]}  # fmt: skip
_RUNS: dict[str, Path] = {}


def tiny_run(name: str, tmp_path_factory) -> Path:
    """The workdir of a two-step training run of task ``name`` (made once per session)."""
    if name not in _RUNS:
        config, overrides = RUNLOCAL[name]
        for needed in [n for n in RUNLOCAL if any(f"{{{n}}}" in o for o in overrides)]:
            overrides = [o.replace(f"{{{needed}}}", str(tiny_run(needed, tmp_path_factory))) for o in overrides]
        workdir = tmp_path_factory.mktemp(name.replace(".", "_"))
        train.main(["--config", config, "--workdir", str(workdir),
                    "--set", "train.steps=2", "eval.final=False", *overrides])  # fmt: skip
        _RUNS[name] = workdir
    return _RUNS[name]


def without_data(workdir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of ``workdir`` whose config points its data at paths that do not exist, with every task's
    ``build_datasets`` made to fail: what predicts from it has read no dataset."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    missing = tmp_path / "no_data"
    for key, value in config["data"].items():
        if key == "root" or (isinstance(value, str) and Path(value).exists()):
            config["data"][key] = str(missing / key)
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(missing))

    def no_datasets(*args, **kwargs):
        raise AssertionError("a dataset was built")

    get_task = tasks.get_task
    monkeypatch.setattr(tasks, "get_task", lambda n: dataclasses.replace(get_task(n), build_datasets=no_datasets))
    return copy


def user_images(folder: Path) -> list[Path]:
    """Two photos of different sizes and aspect ratios, neither the config's image size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / "wide.png", folder / "tall.jpg"]
    for path, (h, w) in zip(paths, [(37, 45), (60, 30)], strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return paths


def largest_patch(workdir: Path) -> int:
    """The cheapest of the run's evaluation patch sizes (seconds matter: CI has 2 cores)."""
    sizes = json.loads((workdir / "config.json").read_text())["eval"]["patch_sizes"]
    return max(p for p in sizes if isinstance(p, int))


@pytest.mark.parametrize("name", tasks.TASKS)
def test_every_task_has_a_smoke_config_here(name):
    assert name in RUNLOCAL, f"add task {name}'s runlocal config to RUNLOCAL"


@pytest.mark.parametrize("name", tasks.TASKS)
def test_predict_gives_the_tasks_prediction_without_the_data(name, tmp_path_factory, tmp_path, monkeypatch, capsys):
    task = tasks.get_task(name)
    workdir = without_data(tiny_run(name, tmp_path_factory), tmp_path, monkeypatch)
    images = user_images(tmp_path / "photos")
    patch = largest_patch(workdir)
    argv = ["--workdir", str(workdir), "--patch-size", str(patch), "--out", str(tmp_path / "out")]
    if task.predict is None:  # the declared refusal, said as the task says it
        with pytest.raises(SystemExit) as info:
            predict.main([*argv, *map(str, images)])
        assert name in str(info.value.code) and task.predict_refusal in str(info.value.code)
        return

    options = [arg for key in task.predict_options if key in OPTION_VALUES for arg in OPTION_VALUES[key]]
    argv = [*argv, *map(str, images), *options]
    result = predict.main(argv)
    printed = capsys.readouterr().out
    assert list(result["results"]) == [str(p) for p in images] and result["patch_size"] == patch
    for path, summary in result["results"].items():
        assert summary.strip() and "\n" not in summary and f"{path}: {summary}" in printed

    # What the task itself predicts from the same checkpoint, images, patch size and options.
    run, args = tasks.load_run(workdir), predict.parse_args(argv)
    given = {key: getattr(args, key) for key in task.predict_options if getattr(args, key, None) is not None}
    opened = [open_image(p) for p in images]
    want = task.predict(run.model, run.config, run.info, opened, patch, given)
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert records == [{"file": str(p), **json.loads(json.dumps(w.record))} for p, w in zip(images, want, strict=True)]
    for path, image, w in zip(images, opened, want, strict=True):
        written = tmp_path / "out" / f"{path.stem}.png"
        assert written.exists() == (w.image is not None)
        if w.image is not None:
            got = Image.open(written)
            assert got.size == image.size  # the input's size, whatever the model ran at
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(w.image.convert("RGB")))
    assert (tmp_path / "out" / "legend.png").exists() == any(w.legend is not None for w in want)


@pytest.mark.parametrize("name", tasks.TASKS)
def test_predict_refuses_an_option_the_task_does_not_take(name, tmp_path_factory, tmp_path, capsys):
    task = tasks.get_task(name)
    refused = [key for key in OPTION_VALUES if key not in task.predict_options]
    if task.predict is None or not refused:
        pytest.skip(f"{name} takes every option, or does not predict")
    image = user_images(tmp_path)[0]
    flag = OPTION_VALUES[refused[0]]
    with pytest.raises(SystemExit) as info:
        predict.main(["--workdir", str(tiny_run(name, tmp_path_factory)), "--patch-size", "16", str(image), *flag])
    message = str(info.value.code)
    assert f"task {name} does not take {flag[0]}" in message and "\n" not in message


def test_predict_exits_1_when_no_image_could_be_read(tmp_path_factory, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(SystemExit) as info:
        predict.main(["--workdir", str(tiny_run("segmentation", tmp_path_factory)), "--patch-size", "16",
                      str(folder)])  # fmt: skip
    assert "none of the 1 input image(s) could be read" in str(info.value.code)


def test_predict_runs_under_the_requested_autocast(tmp_path_factory, tmp_path, monkeypatch):
    seen = []
    task = tasks.get_task("segmentation")

    def spy(model, config, info, images, patch_size, options):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return task.predict(model, config, info, images, patch_size, options)

    get_task = tasks.get_task
    monkeypatch.setattr(tasks, "get_task", lambda n: dataclasses.replace(get_task(n), predict=spy))
    images = user_images(tmp_path)
    workdir = tiny_run("segmentation", tmp_path_factory)
    predict.main(["--workdir", str(workdir), "--patch-size", "16", "--precision", "bf16", "--device", "cpu",
                  "--batch", "1", "--out", str(tmp_path / "out"), *map(str, images)])  # fmt: skip
    assert seen == [torch.bfloat16, torch.bfloat16]  # one call per batch of 1
