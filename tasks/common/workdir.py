"""A training workdir is a small database: one run per folder, checked before the first write, every record once.

    W/config.json          the run's resolved config (written once the run has started)
    W/checkpoints/         ckpt_{step}.pt, written atomically (tasks/common/train_state.py)
    W/log.jsonl            metrics, one JSON object per logged step (tasks/common/writers.py)
    W/patch_sizes.jsonl    the patch size of every step
    W/tb/, W/eval.json     TensorBoard events; the last evaluation
    W/eval/, W/deploy/, W/analysis/, W/predictions/   what the tools derived from the run's weights

The engine calls :func:`check_workdir` before it writes anything, so a refused or failed start leaves every file as
it was; then, once the config is valid and a resumed checkpoint is loaded, :func:`start` clears what an interrupted
run left behind (temp files, log records after the checkpoint) or, with ``--overwrite``, the old run itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flexivit.files import atomic_write_text
from tasks.common.config import Config, ConfigError
from tasks.common.train_state import checkpoints

RUN_FILES = ("config.json", "log.jsonl", "patch_sizes.jsonl", "eval.json")
RUN_DIRS = ("checkpoints", "tb", "eval", "deploy", "analysis", "predictions")
LOGS = ("log.jsonl", "patch_sizes.jsonl")  # one record per step, cut back to the checkpoint on resume


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked (it holds another run, or no run to resume)."""


def read_config(path: str | Path) -> Config:
    """A run's ``config.json``; a damaged one is a ConfigError naming it, with the way out."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable JSON config ({error}): restore it, or give the config the run was trained "
            "with (--config FILE plus the same --set overrides)"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds a JSON {type(saved).__name__}, not a config object: restore it")
    return Config(saved)


def describe_run(workdir: str | Path) -> str | None:
    """A line on the run ``workdir`` holds (task, model, last checkpoint), or None when it holds none."""
    workdir = Path(workdir)
    found = checkpoints(workdir)
    if not found and not any((workdir / name).exists() for name in RUN_FILES):
        return None
    try:
        config = json.loads((workdir / "config.json").read_text())
        what = f"task {config.get('task')!r}, model {config.get('model', {}).get('name')!r}"
    except (OSError, ValueError, AttributeError):
        what = "no readable config.json"
    step = f"last checkpoint {found[-1].name}" if found else "no checkpoint yet"
    return f"{what}, {step}"


def check_workdir(workdir: str | Path, *, resume: bool, overwrite: bool, has_config: bool) -> str:
    """Decide what the run does with ``workdir`` without touching it: "new", "resume" or "overwrite".

    A workdir that holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (delete it first);
    ``resume`` on a workdir without a run starts a new one only when a config was given, and says so.
    """
    workdir = Path(workdir)
    if resume and overwrite:
        raise WorkdirError("--resume continues the run in --workdir and --overwrite deletes it: choose one")
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder")
    run = describe_run(workdir)
    if run is None:
        if resume and not has_config:
            raise WorkdirError(
                f"--resume: {workdir} holds no run (no config.json, no checkpoints/ckpt_*.pt); check the path, "
                "or pass --config to start a new run there"
            )
        if resume:
            print(f"--resume: {workdir} holds no run yet: starting a new run", flush=True)
        return "new"
    if resume:
        return "resume"
    if overwrite:
        return "overwrite"
    raise WorkdirError(
        f"--workdir {workdir} already holds a run ({run}). Continue it with --resume, train into a new --workdir, "
        "or pass --overwrite to delete that run's checkpoints, logs and results first"
    )


def remove_run(workdir: str | Path) -> None:
    """Delete everything a previous run (and the tools run on it) wrote into ``workdir``; other files stay."""
    workdir = Path(workdir)
    for name in RUN_FILES:
        (workdir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (workdir / name).is_dir():
            shutil.rmtree(workdir / name)


def remove_temp_files(workdir: str | Path) -> list[Path]:
    """Delete the temp files of writes a crash interrupted (``atomic_write`` names them ``.NAME.XXXX.tmp``)."""
    workdir = Path(workdir)
    found = [p for folder in (workdir, workdir / "checkpoints") for p in folder.glob(".*.tmp") if p.is_file()]
    for path in found:
        path.unlink()
    return found


def cut_logs(workdir: str | Path, step: int) -> None:
    """Drop the log records after ``step`` (a resumed run writes them again) and an ``eval.json`` from after it.

    Records at ``step`` itself were written before its checkpoint (the loop logs, evaluates, then saves), so they
    stay: after any kill and resume every step appears exactly once.
    """
    workdir = Path(workdir)
    for name in LOGS:
        path = workdir / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (at := _record_step(line)) is not None and at <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    evaluation = workdir / "eval.json"
    if evaluation.exists() and (_record_step(evaluation.read_text()) or 0) > step:
        evaluation.unlink()


def _record_step(line: str) -> int | None:
    """The ``step`` of one JSON record; None for a line a kill cut short (dropped with the rest)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def start(workdir: str | Path, mode: str, step: int) -> None:
    """Make ``workdir`` ready for a run that starts (or resumed) at ``step``; main process only."""
    workdir = Path(workdir)
    if mode == "overwrite":
        remove_run(workdir)
        print(f"--overwrite: deleted the previous run's checkpoints, logs and results in {workdir}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    leftovers = remove_temp_files(workdir)
    if leftovers:
        print(f"removed {len(leftovers)} temp file(s) of an interrupted write: {[p.name for p in leftovers]}")
    cut_logs(workdir, step)
