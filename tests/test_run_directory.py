"""The run directory as a small database: bad input to tools.train is named and changes no file; a killed, stopped or
disk-full run leaves every log step once, no temp file and a readable checkpoint; a workdir holds one run."""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from markers import needs_fashion_mnist

import flexivit
from flexivit.files import atomic_write
from tasks import classification
from tasks.common import train_state
from tasks.common.config import ConfigError, apply_overrides, check_config, load_config
from tools import train

ROOT = Path(__file__).resolve().parents[1]
RUNLOCAL = "configs/classification/fashion_mnist.py:runlocal"
MAIN_JOB = "configs/classification/fashion_mnist.py"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(argv, capsys) -> tuple[int, str]:
    """``python -m tools.train ARGV`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.cli(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4), copied by each test that may change it."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    train.main(["--config", RUNLOCAL, "--workdir", str(workdir)])
    return workdir


# ------------------------------------------------------------------------------------------ bad input, no file changed

# (arguments after the workdir, exit code, what the one-line error must name). Each runs against a copy of a finished
# run, whose files must stay byte-identical.
BAD_INPUTS = {
    "not a number": (["--resume", "--set", "train.steps=abc"], 2, "train.steps='abc': expected an integer"),
    "zero steps": (["--resume", "--set", "train.steps=0"], 2, "train.steps=0: expected a positive integer"),
    "negative batch": (["--resume", "--set", "train.batch_size=-32"], 2, "train.batch_size=-32: expected a positive"),
    "float batch": (["--resume", "--set", "train.batch_size=3.5"], 2, "train.batch_size=3.5: expected an integer"),
    "nan lr": (["--resume", "--set", "optim.lr=nan"], 2, "optim.lr=nan: expected a finite learning rate > 0"),
    "zero lr": (["--resume", "--set", "optim.lr=0"], 2, "optim.lr=0.0: expected a finite learning rate > 0"),
    "precision": (["--resume", "--set", "train.precision=fp64"], 2, "train.precision='fp64': expected one of"),
    "ckpt_every 0": (["--resume", "--set", "train.ckpt_every=0"], 2, "train.ckpt_every=0: expected a positive"),
    "log_every 0": (["--resume", "--set", "train.log_every=0"], 2, "train.log_every=0: expected a positive"),
    "accum 0": (["--resume", "--set", "optim.accum_steps=0"], 2, "optim.accum_steps=0: expected a positive"),
    "accum does not divide": (["--resume", "--set", "optim.accum_steps=3"], 2, "optim.accum_steps 3 equal micro"),
    "bool as int": (["--resume", "--set", "train.compile=1"], 2, "train.compile=1: expected true/false"),
    "list as int": (["--resume", "--set", "train.steps=[4]"], 2, "train.steps=[4]: expected an integer"),
    "string as list": (["--resume", "--set", "eval.patch_sizes=eight"], 2, "eval.patch_sizes='eight': expected a list"),
    "no eval sizes": (["--resume", "--set", "eval.patch_sizes=[]"], 2, "eval.patch_sizes=[]: expected a non-empty"),
    "patch too large": (["--resume", "--set", "patch_sizes.sizes=[30]"], 2, "patch size 30 does not fit the 24x24"),
    "negative patch": (["--resume", "--set", "eval.patch_sizes=[8, -2]"], 2, "-2 is not one"),
    "unknown kind": (["--resume", "--set", "patch_sizes.kind=random"], 2, "patch_sizes.kind='random': expected one"),
    "bad regex": (["--resume", "--set", "optim.frozen=['(']"], 2, "optim.frozen=['(']: expected valid regular"),
    "momentum 1": (["--resume", "--set", "optim.momentum=1.0"], 2, "optim.momentum=1.0: expected a momentum in"),
    "unknown key": (["--resume", "--set", "train.lr=0.1"], 2, "unknown config key 'train.lr'"),
    "no =": (["--resume", "--set", "train.steps"], 2, "override 'train.steps' is not of the form key=value"),
    "architecture": (["--resume", "--set", "model.overrides.width=64"], 1, "holds another model than the config"),
    "another config": (["--resume", "--config", f"{RUNLOCAL},fixed=8"], 2, "differs from the one saved"),
    "no --resume": (["--config", RUNLOCAL], 2, "already holds a run (task 'classification', model 'flexivit_mu'"),
    "resume and overwrite": (["--resume", "--overwrite"], 2, "choose one"),
    "missing config file": (["--overwrite", "--config", "configs/nope.py"], 2, "config file configs/nope.py not"),
    "misspelt config arg": (["--overwrite", "--config", f"{MAIN_JOB}:fixd=8"], 1, "unknown config argument(s)"),
}


@needs_fashion_mnist
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_changes_no_file(case, trained, tmp_path, capsys):
    args, code, message = BAD_INPUTS[case]
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    got, err = run_cli(["--workdir", str(workdir), *args], capsys)
    assert (got, message in err) == (code, True), err
    assert err.startswith("tools.train: error: ") and "Traceback" not in err
    assert snapshot(workdir) == before


@needs_fashion_mnist
def test_a_corrupt_config_json_is_named_and_the_run_resumes_with_its_config(trained, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    (workdir / "config.json").write_text('{"task": "classification", "model": ')  # a crash of another editor
    before = snapshot(workdir)
    code, err = run_cli(["--workdir", str(workdir), "--resume"], capsys)
    assert code == 2 and f"{workdir / 'config.json'} is not a readable JSON config" in err
    assert "give the config the run was trained with" in err and snapshot(workdir) == before
    train.main(["--workdir", str(workdir), "--resume", "--config", RUNLOCAL])  # the way out it names
    assert json.loads((workdir / "config.json").read_text())["task"] == "classification"


def test_resume_of_a_workdir_without_a_run_is_refused_or_starts_a_new_run_only_with_a_config(tmp_path, capsys):
    typo = tmp_path / "runs" / "fashion_mnsit"
    code, err = run_cli(["--workdir", str(typo), "--resume"], capsys)
    assert code == 2 and f"{typo} holds no run" in err and not typo.exists()


@needs_fashion_mnist
def test_resume_with_a_config_on_an_empty_workdir_says_it_starts_a_new_run(tmp_path, capsys):
    train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--resume", "--set", "train.steps=1"])
    assert "holds no run yet: starting a new run" in capsys.readouterr().out
    assert (tmp_path / "w" / "checkpoints" / "ckpt_00000001.pt").exists()


@needs_fashion_mnist
def test_overwrite_deletes_the_old_run_before_the_new_one_starts(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for derived in ("eval", "deploy"):  # what tools derived from the old weights goes with them
        (workdir / derived).mkdir()
        (workdir / derived / "sweep.csv").write_text("old\n")
    (workdir / "notes.txt").write_text("mine\n")  # a file that is not the run's stays
    train.main(["--config", RUNLOCAL, "--workdir", str(workdir), "--overwrite", "--set", "train.steps=1"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["ckpt_00000001.pt"]
    assert not (workdir / "eval").exists() and not (workdir / "deploy").exists()
    assert (workdir / "notes.txt").read_text() == "mine\n"
    assert [json.loads(line)["step"] for line in (workdir / "patch_sizes.jsonl").read_text().splitlines()] == [1]
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 1


# ------------------------------------------------------------------------------------------ values, checked at the door


def test_overrides_keep_the_type_of_the_default():
    config = load_config(RUNLOCAL)
    out = apply_overrides(config, ["optim.lr=1", "train.steps=1e3", "optim.clip_norm=None", "eval.patch_sizes=(8, 6)"])
    assert (out.optim.lr, type(out.optim.lr)) == (1.0, float)  # an int is a fine float
    assert (out.train.steps, type(out.train.steps)) == (1000, int)  # 1e3 is a whole number
    assert out.optim.clip_norm is None and out.eval.patch_sizes == [8, 6]
    with pytest.raises(ConfigError, match=r"train.steps=2.5: expected an integer like its default 4, got float"):
        apply_overrides(config, ["train.steps=2.5"])
    with pytest.raises(ConfigError, match=r"model.name=5: expected a string"):
        apply_overrides(config, ["model.name=5"])


def test_every_config_and_preset_passes_the_checks():
    checked = 0
    for path in sorted((ROOT / "configs").rglob("*.py")):
        if "def get_config" not in path.read_text():
            continue
        check_config(load_config(f"{path.relative_to(ROOT)}:runlocal"))
        try:
            full = load_config(str(path.relative_to(ROOT)))
        except ValueError:  # needs an argument (a teacher's workdir, a dataset name), as its docstring says
            continue
        check_config(full)
        checked += 1
    assert checked >= 10


def test_all_problems_of_a_config_are_named_at_once():
    config = apply_overrides(load_config(RUNLOCAL), ["train.steps=0", "optim.lr=-1", "data.value_range=[1, 0]"])
    with pytest.raises(ConfigError) as error:
        check_config(config)
    lines = str(error.value).splitlines()[1:]
    assert [line.split("=")[0].strip() for line in lines] == ["optim.lr", "train.steps", "data.value_range"]


def test_a_curriculum_refuses_an_override_of_sizes_it_would_ignore():
    config = load_config(MAIN_JOB)  # 1000 steps at 16, then uniform over [16, 12, 8, 6, 4]
    with pytest.raises(ConfigError, match=r"patch_sizes.sizes=\[4\]: a curriculum draws from its stages.*kind=uniform"):
        check_config(apply_overrides(config, ["patch_sizes.sizes=[4]"]))
    honoured = apply_overrides(config, ["patch_sizes.kind=uniform", "patch_sizes.sizes=[4]", "patch_sizes.stages=None"])
    check_config(honoured)
    sampler = flexivit.build_sampler(**{"seed": 0, **honoured.patch_sizes})
    assert {sampler(step) for step in range(50)} == {4}
    with pytest.raises(ConfigError, match="patch_sizes.stages is only read by patch_sizes.kind=curriculum"):
        check_config(apply_overrides(config, ["patch_sizes.kind=uniform"]))
    with pytest.raises(ValueError, match=r"sizes \[4\] are not the curriculum's"):  # the library says the same
        flexivit.build_sampler(**{"seed": 0, **apply_overrides(config, ["patch_sizes.sizes=[4]"]).patch_sizes})


# ------------------------------------------------------------------------------------------ kills, Ctrl-C, full disks


def log_steps(workdir: Path, name: str, key: str = "") -> list[int]:
    """The steps of the records of a log (those that hold ``key``)."""
    records = [json.loads(line) for line in (workdir / name).read_text().splitlines()]
    return [r["step"] for r in records if not key or key in r]


@needs_fashion_mnist
def test_after_a_kill_and_a_resume_every_step_is_logged_once_and_no_temp_file_is_left(tmp_path):
    workdir, steps = tmp_path / "w", 30
    args = ["--config", RUNLOCAL, "--workdir", str(workdir), "--set", f"train.steps={steps}", "train.ckpt_every=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tools.train", *args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    patches, deadline = workdir / "patch_sizes.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if patches.exists() and len(patches.read_text().splitlines()) >= 14:  # past the checkpoint at step 10
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(log_steps(workdir, "patch_sizes.jsonl"))
    assert killed_at >= 14 and log_steps(workdir, "log.jsonl")[-1] >= 14  # flushed as they were written
    # A write the kill interrupted leaves its temp file (atomic_write's name for it).
    (workdir / "checkpoints" / f".ckpt_{killed_at:08d}.pt.k1ll3d.tmp").write_bytes(b"\0" * 100)
    train.main([*args, "--resume"])
    every_step = list(range(1, steps + 1))  # runlocal logs every step
    assert log_steps(workdir, "patch_sizes.jsonl") == every_step
    assert log_steps(workdir, "log.jsonl", "train/loss") == every_step
    assert log_steps(workdir, "log.jsonl", "eval/top1_p8") == [steps]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["ckpt_00000020.pt", "ckpt_00000030.pt"]


@needs_fashion_mnist
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    common = ["--config", RUNLOCAL, "--set", "train.steps=6", "train.ckpt_every=4"]
    train.main([*common, "--workdir", str(tmp_path / "straight")])
    real_make_loss = classification.TASK.make_loss

    def make_loss(config, info, teacher=None):
        real_loss = real_make_loss(config, info, teacher)

        def ctrl_c_in_step_3(net, batch, patch, step):
            if step == 2:  # the third step: Ctrl-C arrives mid-step, the step still completes
                signal.raise_signal(signal.SIGINT)
            return real_loss(net, batch, patch, step)

        return ctrl_c_in_step_3

    workdir, handler = tmp_path / "stopped", signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(classification, "TASK", dataclasses.replace(classification.TASK, make_loss=make_loss))
    code, err = run_cli([*common, "--workdir", str(workdir)], capsys)
    assert code == 130 and "stopped by Ctrl-C after step 3 of 6" in err and "ckpt_00000003.pt" in err
    assert f"Resume with: python -m tools.train --workdir {workdir} --resume" in err
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    monkeypatch.undo()
    train.main(["--workdir", str(workdir), "--resume"])
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000006.pt", weights_only=True)["model"]
    resumed = torch.load(workdir / "checkpoints" / "ckpt_00000006.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert log_steps(workdir, "patch_sizes.jsonl") == list(range(1, 7))


def test_a_full_disk_is_named_with_the_path_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write(target, lambda tmp: torch.save({"w": torch.ones(3)}, tmp))
    before = target.read_bytes()
    # /dev/full fails every write with ENOSPC: torch's own writer reports it as "unexpected pos".
    with pytest.raises(OSError, match=rf"no space left on the device while writing {target}.*previous file there"):
        atomic_write(target, lambda tmp: torch.save({"w": torch.zeros(10_000)}, "/dev/full"))

    def enospc(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as error:
        atomic_write(target, enospc)
    assert error.value.errno == errno.ENOSPC and str(target) in str(error.value)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@needs_fashion_mnist
def test_a_full_disk_while_checkpointing_stops_training_with_the_path(trained, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    real_save = torch.save
    monkeypatch.setattr(train_state.torch, "save", lambda state, tmp: real_save(state, "/dev/full"))
    code, err = run_cli(["--workdir", str(workdir), "--resume", "--set", "train.steps=6"], capsys)
    assert code == 1 and "no space left on the device while writing" in err and "ckpt_00000006.pt" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
