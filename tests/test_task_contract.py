"""The task contract (tasks/__init__.py), tested for every task in ``tasks.TASKS``, as timm tests every model of its
registry: a new task module with its ``runlocal`` config is picked up here without editing this file.

For each task, its ``runlocal`` run is trained twice for 4 steps, once straight and once interrupted after step 2 and
resumed. Then: the resumed run ends with the same weights as the straight one; ``load_run`` rebuilds the training
model from the checkpoint alone (every dataset reader made to fail) with bit-identical outputs; the task predicts on
images of two sizes or refuses with its declared reason; it exports at one patch size with the same outputs or
refuses with its reason; it evaluates at a square and a non-square patch size; two processes evaluate what one does.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from markers import needs_fashion_mnist
from PIL import Image

from tasks import ENGINE_FEATURES, TASKS, Prediction, TaskError, get_task, load_run
from tasks.common.config import Config, load_config
from tasks.common.train_state import latest_checkpoint
from tools import train
from tools.lib.export import FixedSizeModel, export_program, load_program

pytestmark = needs_fashion_mnist  # every runlocal run reads Fashion-MNIST items (the scenes are made of them)

STEPS = 4
EVAL_PATCHES = [8, (8, 12)]  # one square and one non-square patch size; both fit every runlocal image size
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the runs


class Runs:
    """Each task's runlocal workdirs, trained on first use: ``straight`` (4 steps) and ``resumed`` (2 + 2)."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def workdirs(self, name: str) -> dict[str, Path]:
        if name not in self.done:
            self.done[name] = {kind: self._train(name, kind) for kind in ("straight", "resumed")}
        return self.done[name]

    def _train(self, name: str, kind: str) -> Path:
        task = get_task(name)
        workdir = self.root / f"{name}-{kind}"
        needs = [f"{key}={self.workdirs(other)['straight']}" for key, other in task.runlocal_needs.items()]
        args = ["--config", task.runlocal, "--workdir", str(workdir), "--set", f"train.steps={STEPS}",
                "train.ckpt_every=2", "eval.final=False", *needs]  # fmt: skip
        if kind == "resumed":
            with pytest.raises(SystemExit, match="interrupted after step 2"):
                train.main([*args, "--interrupt-after", "2"])
            train.main(["--workdir", str(workdir), "--resume"])
        else:
            train.main(args)
        return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("contract"))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((52, 40, 3), (33, 61, 3))]


def _example(config: Config) -> torch.Tensor:
    size = config.data.image_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))


def forbid_data(monkeypatch) -> None:
    """Every task's ``build_datasets`` and the shared dataset readers fail from here on: what runs reads no data."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was read where only the checkpoint is needed")

    for name in TASKS:
        module = importlib.import_module(f"tasks.{name}")
        monkeypatch.setattr(module, "TASK", dataclasses.replace(module.TASK, build_datasets=refuse))
    from tasks.common import datasets

    monkeypatch.setattr(datasets, "build_dataset", refuse)


# ---------------------------------------------------------------------------------------------- the contract


def test_every_task_module_is_listed_and_declares_its_contract():
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py") if p.parent.name != "common"}
    modules |= {f"panoptic.{p.stem}" for p in (ROOT / "tasks" / "panoptic").glob("stage*.py")}
    with_task = {m for m in modules if hasattr(importlib.import_module(f"tasks.{m}"), "TASK")}
    assert with_task == set(TASKS), "a task module with a TASK is missing from tasks.TASKS, or the reverse"
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert load_config(task.runlocal).task == name, f"{name}: its runlocal config trains another task"
        assert set(task.runlocal_needs.values()) <= set(TASKS)
        assert set(task.predict_options) <= {"topk", "queries", "score_threshold", "nms_iou"}
    with pytest.raises(TaskError, match="unknown task 'segmentaton'"):
        get_task("segmentaton")


@pytest.mark.parametrize("name", TASKS)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(runs, name):
    workdirs = runs.workdirs(name)
    states = [torch.load(latest_checkpoint(w), weights_only=True) for w in workdirs.values()]
    assert states[0]["step"] == states[1]["step"] == STEPS
    assert states[0]["model"].keys() == states[1]["model"].keys()
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), f"{name}: {key} differs after resuming"
    assert states[0]["info"] == states[1]["info"] and states[0]["info"] is not None


def _patches(task) -> list:
    """The contract's patch sizes, or a task's one size (the config's) when its model runs at that one only."""
    return EVAL_PATCHES if task.flexible else list(load_config(task.runlocal).eval.patch_sizes)


@pytest.mark.parametrize("name", TASKS)
def test_load_run_rebuilds_the_training_model_from_the_checkpoint_alone(runs, name, monkeypatch):
    workdir = runs.workdirs(name)["straight"]
    checkpoint = torch.load(latest_checkpoint(workdir), weights_only=True)
    forbid_data(monkeypatch)
    run = load_run(workdir)
    assert run.task is get_task(name) and run.config.task == name and run.info == checkpoint["info"]
    assert not run.model.training
    # The training model: what the engine built, with the weights it saved.
    config = run.config
    trained = run.task.build_model(Config({**config.model, "init": None}), checkpoint["info"])
    trained.load_state_dict(checkpoint["model"])
    trained.eval()
    assert run.model.state_dict().keys() == trained.state_dict().keys()
    x = _example(config)
    with torch.no_grad():
        for patch in _patches(run.task):
            want, got = (
                run.task.image_forward(trained)(x, patch_size=patch),
                run.task.image_forward(run.model)(x, patch_size=patch),
            )
            for a, b in zip(_tensors(want), _tensors(got), strict=True):
                assert torch.equal(a, b), f"{name}: load_run's model computes another output at patch {patch}"


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, list | tuple):
        return [t for v in output for t in _tensors(v)]
    return []


@pytest.mark.parametrize("name", TASKS)
def test_predict_on_images_of_two_sizes_or_refuse_with_the_declared_reason(runs, name, monkeypatch):
    workdir = runs.workdirs(name)["straight"]
    forbid_data(monkeypatch)
    run = load_run(workdir)
    if run.task.predict is None:
        assert len(run.task.predict_refusal) > 20, f"{name}: a refusal must say why"
        return
    images = _images()
    predictions = run.task.predict(run.model, run.config, run.info, images, 8, {})
    assert len(predictions) == len(images)
    for image, prediction in zip(images, predictions, strict=True):
        assert isinstance(prediction, Prediction) and prediction.summary.strip()
        json.dumps(prediction.record)  # JSON-able, as tools.predict writes it
        if prediction.image is not None:
            assert prediction.image.size == image.size, f"{name}: the picture is not at the input's size"


@pytest.mark.parametrize("name", TASKS)
def test_export_at_one_patch_size_or_refuse_with_the_declared_reason(runs, name, tmp_path, monkeypatch):
    workdir = runs.workdirs(name)["straight"]
    forbid_data(monkeypatch)
    run = load_run(workdir)
    size = run.config.data.image_size
    if run.task.export_refusal:
        with pytest.raises(ValueError, match="cannot be exported at one patch size"):
            FixedSizeModel(run.task, run.model, 8, size)
        return
    fixed = FixedSizeModel(run.task, run.model, 8, size)
    x = _example(run.config)
    with torch.no_grad():
        want = run.task.image_forward(run.model)(x, patch_size=8)
        torch.testing.assert_close(fixed(x), want, atol=1e-5, rtol=1e-5)
    export_program(fixed, tmp_path / "model.pt2", x)
    program, _ = load_program(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_at_a_square_and_a_non_square_patch_size(runs, name):
    run = load_run(runs.workdirs(name)["straight"])
    _, _, val_set, _ = run.task.build_datasets(run.config.data)
    device = torch.device("cpu")
    if not run.task.flexible:  # one patch size: asked for another, it says so instead of answering for its own
        with pytest.raises(ValueError, match=r"patch size .* only"):
            run.task.evaluate(run.model, val_set, EVAL_PATCHES, device, None, 4)
    patches = _patches(run.task)
    both = run.task.evaluate(run.model, val_set, patches, device, None, 4)
    assert set(both) == set(patches)
    alone = run.task.evaluate(run.model, val_set, [patches[-1]], device, None, 4)
    for metric, value in both[patches[-1]].items():  # each patch size is evaluated on its own
        assert value == pytest.approx(alone[patches[-1]][metric], rel=1e-6, abs=1e-9), metric
    for results in both.values():
        assert results and all(math.isfinite(v) for v in results.values() if isinstance(v, int | float))


def test_two_processes_evaluate_what_one_does(runs, tmp_path):
    workdirs = [str(runs.workdirs(name)["straight"]) for name in TASKS]
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               str(ROOT / "tests" / "contract_ddp_eval.py"), str(out), *workdirs]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    from contract_ddp_eval import evaluate_run

    for workdir, name in zip(workdirs, TASKS, strict=True):
        one = evaluate_run(workdir)
        assert two[workdir].keys() == one.keys(), name
        for patch, metrics in one.items():
            for metric, value in metrics.items():
                assert two[workdir][patch][metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, patch, metric)


@pytest.mark.parametrize("name", TASKS)
def test_engine_settings_the_task_ignores_are_refused_by_name(runs, name, tmp_path):
    task = get_task(name)
    config = load_config(task.runlocal)
    asks = {"consistency": ["train.consistency.weight=0.5", "train.consistency.sizes=[8]"]}
    if "mixup" in config.train:
        asks["mixup"] = ["train.mixup=0.2"]
    needs = [f"{key}={runs.workdirs(other)['straight']}" for key, other in task.runlocal_needs.items()]
    for feature, sets in asks.items():
        if feature in task.engine_features:
            continue
        workdir = tmp_path / feature
        with pytest.raises(TaskError, match=f"task {name} does not support {ENGINE_FEATURES[feature]}"):
            train.main(["--config", task.runlocal, "--workdir", str(workdir), "--set", *sets, *needs])
        assert not workdir.exists(), "a refused run must not write anything"
