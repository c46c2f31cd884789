"""Distributed evaluation as it first meets a multi-GPU launch (issue 26), on gloo with torchrun's 2 processes.

- The main process scores (LVISEval, pq_compute) while the others wait: they wait on the store, not in a collective
  that the group's timeout (NCCL's watchdog) ends. Shown with a group timeout shorter than the main process's work:
  the old broadcast times out, :func:`distributed.on_main` does not.
- A rank with no evaluation images (1 image over 2 ranks) takes part in the gathers: every task's evaluate gives the
  numbers of one process.
- The GPU is ``LOCAL_RANK % device_count()``: launches that show each process its own GPU see one, index 0.

This file is also the script torchrun runs (``python -m torch.distributed.run ... tests/test_distributed_eval.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tasks.common import distributed

ROOT = Path(__file__).resolve().parents[1]
SLOW_SCORE_S = 4.0  # the main process's "scoring", longer than the short group timeout below
SHORT_TIMEOUT_MIN = "0.025"  # 1.5 s


def _torchrun(args: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(Path(__file__).resolve()), *args]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s: {stderr[-3000:]}") from None
    return process.returncode, stderr


# ---------------------------------------------------------------------------------------------- the device


@pytest.mark.parametrize(("local_rank", "count", "want"), [(0, 8, 0), (3, 8, 3), (3, 1, 0), (7, 1, 0), (5, 4, 1)])
def test_the_gpu_is_local_rank_modulo_the_visible_ones(monkeypatch, local_rank, count, want):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group: only the device is chosen
    _, _, device = distributed.init()
    assert device == torch.device("cuda", want) and chosen == [want]  # cuda:LOCAL_RANK would be cuda:7 of 1 GPU


def test_the_group_timeout_is_generous_and_set_by_its_variable(monkeypatch):
    monkeypatch.delenv("FLEXIVIT_DIST_TIMEOUT_MIN", raising=False)
    assert distributed.group_timeout() >= timedelta(hours=2)  # NCCL's own default is 10 minutes
    monkeypatch.setenv("FLEXIVIT_DIST_TIMEOUT_MIN", "0.5")
    assert distributed.group_timeout() == timedelta(seconds=30)
    for bad in ("ten", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("FLEXIVIT_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ValueError, match="FLEXIVIT_DIST_TIMEOUT_MIN"):
            distributed.group_timeout()


def test_nccl_without_a_gpu_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("FLEXIVIT_DIST_BACKEND", "nccl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="FLEXIVIT_DIST_BACKEND='nccl'"):
        distributed.init()


# ---------------------------------------------------------------------------------------------- the torchrun script


def _slow_score(out: str, mode: str) -> None:
    """Rank 0 works SLOW_SCORE_S seconds while rank 1 waits for its result: by ``on_main`` or the old broadcast."""

    def score():
        time.sleep(SLOW_SCORE_S)
        return {"AP": 0.25, "rank": distributed.rank()}

    if mode == "on_main":
        metrics = distributed.on_main(score)
        metrics = distributed.on_main(lambda: metrics | {"again": True})  # a second call finds its own result
    else:  # the pattern on_main replaces: the others wait inside a collective
        sent = [score() if distributed.is_main() else None]
        torch.distributed.broadcast_object_list(sent, src=0)
        metrics = sent[0]
    Path(f"{out}.{distributed.rank()}").write_text(json.dumps(metrics))


def _evaluate(workdir: str, val_examples: int) -> dict:
    """``{patch: {metric: value}}`` of the workdir's model on the first ``val_examples`` validation images."""
    from tasks import load_run
    from tasks.common.config import Config

    run = load_run(workdir)
    _, _, val_set, _ = run.task.build_datasets(Config({**run.config.data, "val_examples": val_examples}))
    assert len(val_set) == val_examples
    patches = [8] if run.task.flexible else list(run.config.eval.patch_sizes)
    results = run.task.evaluate(run.model, val_set, patches, torch.device("cpu"), None, 2)
    return {str(p): {k: v for k, v in r.items() if isinstance(v, int | float)} for p, r in results.items()}


def _evaluate_all(out: str, val_examples: str, *workdirs: str) -> None:
    results = {workdir: _evaluate(workdir, int(val_examples)) for workdir in workdirs}
    if distributed.is_main():
        Path(out).write_text(json.dumps(results))


def _main(mode: str, out: str, *args: str) -> None:
    distributed.init()
    try:
        if mode == "evaluate":
            _evaluate_all(out, *args)
        else:
            _slow_score(out, mode)
    finally:
        distributed.shutdown()


# ---------------------------------------------------------------------------------------------- slow main process


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_the_others_outwait_a_slow_main_process_that_a_collective_would_not(tmp_path):
    # Both launched at once (each mostly sleeps); the group's timeout (1.5 s) is shorter than the scoring (4 s).
    env = {"FLEXIVIT_DIST_TIMEOUT_MIN": SHORT_TIMEOUT_MIN}
    new = _torchrun(["on_main", str(tmp_path / "new")], 29541, env)
    old = _torchrun(["broadcast", str(tmp_path / "old")], 29542, env)
    started = time.monotonic()
    (new_rc, new_err), (old_rc, old_err) = _finish(new), _finish(old)
    # The old pattern: rank 1's broadcast gives up after the group's timeout, long before rank 0 has its result.
    assert old_rc != 0 and not (tmp_path / "old.1").exists(), old_err[-3000:]
    assert "timed out" in old_err.lower() or "timeout" in old_err.lower(), old_err[-3000:]
    # on_main: rank 1 waits on the store, holding no collective, and gets rank 0's result of each call.
    assert new_rc == 0, new_err[-3000:]
    want = {"AP": 0.25, "rank": 0, "again": True}
    assert [json.loads((tmp_path / f"new.{r}").read_text()) for r in range(2)] == [want, want]
    assert time.monotonic() - started >= SLOW_SCORE_S


# ---------------------------------------------------------------------------------------------- empty shards


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, str]:
    """Every task's runlocal run, trained one step (stage II on the stage I run, as its runlocal_needs say)."""
    from tasks import TASKS, get_task
    from tools import train

    root, done = tmp_path_factory.mktemp("runs"), {}
    for name in TASKS:  # ordered: a task's needs come before it
        task = get_task(name)
        needs = [f"{key}={done[other]}" for key, other in task.runlocal_needs.items()]
        workdir = root / name
        train.main(["--config", task.runlocal, "--workdir", str(workdir), "--set", "train.steps=1",
                    "train.ckpt_every=1", "eval.final=False", *needs])  # fmt: skip
        done[name] = str(workdir)
    return done


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_every_task_evaluates_with_a_rank_that_has_no_images(workdirs, tmp_path):
    from markers import HAS_FASHION_MNIST

    if not HAS_FASHION_MNIST:
        pytest.skip("the runlocal runs read Fashion-MNIST")
    # One validation image over two ranks: rank 1's shard is empty, yet it must join every gather of rank 0.
    out = tmp_path / "two.json"
    two_processes = _torchrun(["evaluate", str(out), "1", *workdirs.values()], 29543)
    ones = {workdir: _evaluate(workdir, 1) for workdir in workdirs.values()}  # while the two processes run
    code, stderr = _finish(two_processes)
    assert code == 0, stderr[-3000:]
    two = json.loads(out.read_text())
    for name, workdir in workdirs.items():
        one = ones[workdir]
        assert two[workdir].keys() == one.keys(), name
        for patch, metrics in one.items():
            assert metrics and two[workdir][patch].keys() == metrics.keys(), (name, patch)
            for metric, value in metrics.items():
                assert two[workdir][patch][metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, metric)


if __name__ == "__main__":
    _main(*sys.argv[1:])
