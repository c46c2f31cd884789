"""Task heads on the FlexiViT backbone, one module (or package) per task, each exposing one :class:`Task`.

Every tool reaches a task through this contract, never by comparing task names: ``tools/train.py`` trains it,
``tools.eval`` / ``tools.deploy`` / ``tools.analyze`` measure it, ``tools.predict`` / ``tools.demo`` run it on a
user's images and ``tools.export`` leaves PyTorch with it. A task module ``tasks/<name>.py`` (or package) defines
``TASK = Task(...)`` and a config ``configs/<name>/<file>.py`` with ``task="<name>"``; every tool and the contract
tests (tests/test_task_contract.py) pick it up from :data:`TASKS` without further edits.

:func:`load_run` rebuilds a trained model from its checkpoint alone: the training checkpoint holds the weights, the
model's constructor arguments (``model_kwargs``), the resolved config and the task's ``info`` (class names, category
metadata, ...), so no tool reads a dataset unless it computes a metric.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

# Every task the framework ships, by its config name (``config.task``). A new task is one entry here.
TASKS = ("classification", "contrastive", "segmentation", "detection", "panoptic.stage1", "panoptic.stage2")

# The engine settings that depend on the task's loss or data; a task lists those it honours in
# ``Task.engine_features`` and the engine refuses the others by name (gradient checkpointing, compile and precision
# are the engine's own and work for every task).
ENGINE_FEATURES = {
    "consistency": "train.consistency.weight",
    "distill": "distill",
    "mixup": "train.mixup",
}


def backbone_token_grid(image_hw, patch) -> tuple[int, int]:
    """The backbone's token grid: it drops the border that the patches do not tile (the strided convolution's rule)."""
    return (image_hw[0] // patch[0], image_hw[1] // patch[1])


@dataclass(frozen=True)
class Prediction:
    """One image's prediction, in the forms a user looks at.

    ``summary``: one line for the terminal and the demo page; ``record``: JSON-able (COCO-style detections, panoptic
    segments, top-k classes, ...); ``image``: a picture at the input's size (boxes drawn on the image, or a colour
    map); ``overlay``: True when ``image`` is a map to lay over the input (the demo blends it), False when it already
    shows the input; ``legend``: a colour legend for the map, if any.
    """

    summary: str
    record: dict
    image: Any = None  # PIL.Image.Image | None
    overlay: bool = False
    legend: Any = None  # PIL.Image.Image | None


def ranked_predictions(scores, names, k: int, *, name: str, score: str, fmt: str, show=str) -> list[Prediction]:
    """One :class:`Prediction` per row of ``scores`` (B, N) over ``names``: the ``k`` best, as a record
    ``{"top": [{name: ..., score: ...}, ...]}`` and a summary ``"shirt 0.91, t-shirt 0.05"`` (``fmt`` formats a
    score, ``show`` a name)."""
    values, indices = scores.topk(min(int(k), len(names)), -1)
    predictions = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        top = [{name: names[i], score: v} for v, i in zip(row_values, row_indices, strict=True)]
        summary = ", ".join(f"{show(t[name])} {t[score]:{fmt}}" for t in top)
        predictions.append(Prediction(summary=summary, record={"top": top}))
    return predictions


@dataclass(frozen=True)
class Task:
    """What a task gives the engine and the tools. Required first; the optional ones default to the backbone's
    behaviour or a declared refusal.

    - ``build_datasets(data, distill=None) -> (train_set, train_transform, val_set, info)``: ``train_transform`` runs
      per item under a seed from ``(seed, epoch, index)`` (tasks/common/loader.py). ``info`` is what ``build_model``
      needs and what inference needs beyond the weights (class names, category metadata): plain JSON-like values,
      saved in every checkpoint.
    - ``build_model(model_cfg, info) -> nn.Module``: the backbone (weights from ``model_cfg.init``) plus the head.
    - ``make_loss(config, info, teacher=None) -> loss(net, batch, patch_size, step) -> (loss, terms)``: built once;
      the returned function reads no config. ``terms`` are named scalars the engine averages and logs as
      ``train/<name>``. ``net`` may be wrapped in DDP / torch.compile: call it, do not reach inside. Random draws
      use the global RNG, which the engine seeds from ``(seed, step, rank)`` before every step.
    - ``evaluate(model, val_set, patch_sizes, device, autocast_dtype=None, batch_size=...) -> {patch: {metric: v}}``:
      every metric at every patch size, summed over ranks through ``tasks.common.distributed``.
    - ``load_model(checkpoint) -> nn.Module``: the model rebuilt from one checkpoint file alone (its ``model_kwargs``
      and weights; a frozen part such as the panoptic oracle is inside it).
    - ``predict(model, config, info, images, patch_size, options) -> [Prediction]``: the task on a list of RGB
      ``PIL`` images at one patch size, the model already on its device (the caller sets autocast). ``options``
      holds the keys of ``predict_options`` the user gave. None: ``predict_refusal`` says why.
    - ``image_forward(model) -> fn(images, patch_size=p)``: what is counted (GFLOPs), timed and exported.
    - ``token_grid(image_hw, (ph, pw)) -> (gh, gw)``: the grid at a patch size (a task that pads says so).
    - ``export_refusal``: empty when ``image_forward`` exports at one patch size, else the reason it cannot.
    - ``collate(items) -> batch``: the training batch, for variable-length targets (default: torch's).
    - ``engine_features``: the keys of :data:`ENGINE_FEATURES` the task honours.
    - ``flexible``: False for a model that runs at its one patch size only (the panoptic stage I oracle): asked for
      another, its ``evaluate`` and ``image_forward`` raise a ValueError naming the patch size.
    - ``runlocal``: the config of the task's smallest real run (seconds on a CPU), which the contract tests
      (tests/test_task_contract.py) train, resume, reload, evaluate, predict and export; ``runlocal_needs`` maps a
      config key to the task whose runlocal workdir it must name (stage II's ``model.oracle``: the stage I run).
    """

    name: str
    build_datasets: Callable[..., tuple]
    build_model: Callable[..., nn.Module]
    make_loss: Callable[..., Callable]
    evaluate: Callable[..., dict]
    load_model: Callable[[str | Path], nn.Module]
    predict: Callable[..., list[Prediction]] | None = None
    predict_options: tuple[str, ...] = ()
    predict_refusal: str = ""
    image_forward: Callable[[nn.Module], Callable] = lambda model: model
    token_grid: Callable[..., tuple[int, int]] = backbone_token_grid
    export_refusal: str = ""
    collate: Callable | None = None
    engine_features: frozenset[str] = field(default_factory=frozenset)
    flexible: bool = True
    runlocal: str = ""
    runlocal_needs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.engine_features) - set(ENGINE_FEATURES)
        if unknown:
            raise ValueError(f"task {self.name}: unknown engine features {sorted(unknown)}; known: {ENGINE_FEATURES}")
        if (self.predict is None) == (not self.predict_refusal):
            raise ValueError(f"task {self.name}: give either predict or predict_refusal")


class TaskError(ValueError):
    """A config or run that the task contract cannot serve: an unknown task, or a setting the task refuses."""


def get_task(name: str) -> Task:
    """The :class:`Task` of ``config.task`` (``"classification"``, ``"panoptic.stage2"``, ...)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}").TASK


def check_engine_features(task: Task, config) -> None:
    """Refuse, naming the task and the key, an engine setting the task's loss or data would silently ignore."""
    asked = {
        "consistency": bool((config.train.get("consistency") or {}).get("weight")),
        "distill": bool(config.get("distill")),
        "mixup": bool(config.train.get("mixup")),
    }
    refused = [ENGINE_FEATURES[f] for f, on in asked.items() if on and f not in task.engine_features]
    if refused:
        raise TaskError(
            f"task {task.name} does not support {', '.join(refused)}: it would be ignored; "
            f"turn it off (it supports {', '.join(ENGINE_FEATURES[f] for f in sorted(task.engine_features)) or 'none'})"
        )


class Run(NamedTuple):
    """A trained model and what it came with: :func:`load_run`'s result."""

    task: Task
    model: nn.Module
    config: Any  # tasks.common.config.Config
    info: Any
    checkpoint: Path


def load_run(source: str | Path, config=None) -> Run:
    """The task, model (on CPU, in eval mode), config and info of a training workdir (its newest checkpoint) or of
    one checkpoint file, from the checkpoint alone: no dataset is read.

    ``config`` (a :class:`Config`) replaces the saved one, e.g. to evaluate on other data; the model is still
    rebuilt from the checkpoint. Raises :class:`RunError` naming the file when something is missing.
    """
    from tasks.common.config import Config, ConfigError
    from tasks.common.train_state import latest_checkpoint, read_run_checkpoint
    from tasks.common.workdir import read_config

    source = Path(source)
    if source.is_dir():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise RunError(f"{source} has no checkpoint under checkpoints/: is it a training workdir?")
    elif source.is_file():
        checkpoint = source
    else:
        raise RunError(f"{source}: no such workdir or checkpoint file")
    saved_config, info = read_run_checkpoint(checkpoint)
    if config is None:
        if source.is_dir() and (source / "config.json").is_file():
            try:
                config = read_config(source / "config.json")
            except ConfigError as e:
                raise RunError(str(e)) from e
        elif saved_config is not None:
            config = Config(json.loads(saved_config))
        else:
            raise RunError(f"{checkpoint} holds no config and {source} has no config.json: give the config (--config)")
    task = get_task(config.task)
    if info is None:  # a checkpoint written before checkpoints held the task's info: only the data knows it
        info = task.build_datasets(config.data)[3]
    model = task.load_model(checkpoint)
    return Run(task, model.eval(), config, info, checkpoint)


class RunError(ValueError):
    """A workdir or checkpoint that :func:`load_run` cannot rebuild a model from, named."""


__all__ = [
    "ENGINE_FEATURES",
    "TASKS",
    "Prediction",
    "Run",
    "RunError",
    "Task",
    "TaskError",
    "backbone_token_grid",
    "check_engine_features",
    "get_task",
    "load_run",
    "ranked_predictions",
]
