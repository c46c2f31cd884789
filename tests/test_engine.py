"""The training engine and the eval sweep: smoke runs of every config, exact resume, DDP, errors."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from markers import needs_fashion_mnist

import flexivit
from flexivit.files import atomic_write_text
from tasks import classification
from tasks.common import distributed
from tasks.common.config import ConfigError, apply_overrides, load_config, save_config
from tasks.common.loader import eval_loader
from tasks.common.losses import mixed_cross_entropy
from tools import eval as eval_tool
from tools import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py") if "def get_config" in p.read_text()
)
RUNLOCAL = "configs/classification/fashion_mnist.py:runlocal"


def final_weights(workdir) -> dict:
    return torch.load(sorted(Path(workdir, "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)["model"]


@needs_fashion_mnist
@pytest.mark.parametrize("config", CONFIGS)
def test_runlocal_of_every_config_trains_and_evaluates(config, tmp_path):
    results = train.main(["--config", f"{config}:runlocal", "--workdir", str(tmp_path), "--set", "train.steps=2"])
    assert results  # {patch size: {metric: value}} for every evaluated patch size, all finite
    assert all(torch.isfinite(torch.tensor(float(v))) for r in results.values() for v in r.values())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in log if "train/loss" in e)
    assert (tmp_path / "checkpoints" / "ckpt_00000002.pt").exists()


@needs_fashion_mnist
def test_final_evaluation_can_be_left_to_tools_eval(tmp_path):
    results = train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "eval.final=False"])
    assert results == {} and not (tmp_path / "eval.json").exists()
    assert (tmp_path / "checkpoints" / "ckpt_00000004.pt").exists()  # the weights tools.eval will sweep


@needs_fashion_mnist
def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)  # the model's initialisation; measured: 2.30 -> ~0.4 after 60 steps for seeds 0 and 1
    config = load_config(RUNLOCAL)
    config.data.crop_scale = [0.6, 1.0]  # the measurement's images (uncropped ones memorise slower: ~0.7 at step 60)
    train_set, train_tf, _, classes = classification.build_datasets(config.data)
    model = classification.build_model(config.model, classes)
    images = torch.stack([train_tf(train_set[i][0]) for i in range(16)])
    labels = torch.tensor([train_set[i][1] for i in range(16)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss = mixed_cross_entropy(model(images, patch_size=[12, 8, 6][step % 3]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0]  # memorising 16 images: a broken gradient path stays near log(10) = 2.3


# Every random consumer on: mixup, drop-path (depth 2: the first block's rate is 0), RandAugment; and the
# segmentation decoder's dropout. Before, the resumed run ended 3.5e-4 (max abs weight) away from the straight one.
RANDOM = {
    "classification": [
        "--config",
        RUNLOCAL,
        "--set",
        "train.mixup=0.8",
        "data.randaugment=True",
        "model.overrides={'depth': 2, 'width': 32, 'num_heads': 2, 'base_patch_size': 16, 'posemb_grid': 7, "
        "'patch_size': 8, 'drop_path_rate': 0.3}",
    ],
    "segmentation": ["--config", "configs/segmentation/scenes.py:runlocal", "--set", "model.decoder_dropout=0.5"],
}


def resume_args(task, steps=8):
    args = list(RANDOM[task])
    return [*args, f"train.steps={steps}", "train.ckpt_every=3", "optim.warmup_steps=2", "eval.patch_sizes=[8]"]


def patch_sequence(workdir):
    lines = [json.loads(line) for line in (workdir / "patch_sizes.jsonl").read_text().splitlines()]
    return {e["step"]: e["patch_size"] for e in lines}  # the resumed run rewrites the steps it repeats


def assert_same_weights(a, b):
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max abs difference {(a[key] - b[key]).abs().max().item():.3g}"


@needs_fashion_mnist
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_resume_with_random_draws_gives_the_weights_of_an_uninterrupted_run(tmp_path, task):
    common = resume_args(task)
    train.main([*common, "--workdir", str(tmp_path / "straight")])
    with pytest.raises(SystemExit, match="interrupted after step 4"):
        train.main([*common, "--workdir", str(tmp_path / "resumed"), "--interrupt-after", "4"])
    torch.rand(7)  # whatever the process drew in between must not matter
    train.main([*common, "--workdir", str(tmp_path / "resumed"), "--resume"])  # from step 3: step 4 is redone
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    sequence = patch_sequence(tmp_path / "straight")
    assert sequence == patch_sequence(tmp_path / "resumed") and len(set(sequence.values())) > 1


def torchrun(args, workdir, port, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tools.train", *args, "--workdir", str(workdir)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_fashion_mnist
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_two_process_resume_with_random_draws_is_exact(tmp_path):
    # Each rank draws its own mixup ratio, drop-path masks and augmentations from (seed, step, rank): nothing of
    # rank 1's random state may be lost or replaced by rank 0's when resuming.
    common = resume_args("classification", steps=6)
    done = torchrun(common, tmp_path / "straight", 29521)
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun([*common, "--interrupt-after", "4"], tmp_path / "resumed", 29522)
    assert done.returncode != 0 and "interrupted after step 4" in done.stderr, done.stderr[-3000:]
    done = torchrun([*common, "--resume"], tmp_path / "resumed", 29523)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))


@needs_fashion_mnist
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_torchrun_two_processes_match_one_process(tmp_path):
    args = ["--config", RUNLOCAL, "--set", "train.steps=3", "optim.warmup_steps=0"]
    train.main([*args, "--workdir", str(tmp_path / "one")])
    done = torchrun(args, tmp_path / "two", 29517)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert any(e.get("replicas_identical") for e in log)  # checked by the engine across ranks
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for key in one:  # the global batch is split across ranks and the gradients averaged: the same update
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


@needs_fashion_mnist
def test_eval_sweep_matches_a_direct_computation(tmp_path):
    train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "train.steps=3"])
    rows = eval_tool.main(["--workdir", str(tmp_path), "--patch-sizes", "12", "6", "--timing-batch", "4"])
    assert [r["patch_size"] for r in rows] == [12, 6] and [r["tokens"] for r in rows] == [4, 16]
    assert rows[1]["gflops"] > rows[0]["gflops"] > 0 and rows[0]["img_per_s"] > 0
    model = flexivit.load_model(next((tmp_path / "checkpoints").glob("ckpt_00000003.pt"))).eval()
    _, _, val_set, _ = classification.build_datasets(load_config(RUNLOCAL).data)
    for row, patch in zip(rows, (12, 6), strict=True):
        correct = 0
        with torch.no_grad():
            for images, labels in eval_loader(val_set, batch_size=7):
                correct += (model(images, patch_size=patch).argmax(-1) == labels).sum().item()
        assert row["accuracy"] == pytest.approx(correct / len(val_set), abs=1e-12)
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 100
    assert "| 12 |" in (tmp_path / "eval" / "sweep.md").read_text().replace("  ", " ")
    best = max(rows, key=lambda r: (r["accuracy"], -r["gflops"]))
    assert [r["best"] for r in rows] == ["yes" if r is best else "" for r in rows]


def test_eval_names_the_best_patch_size_per_model_cheaper_on_ties():
    rows = [
        {"model": "a", "patch_size": 16, "gflops": 1.0, "AP": 0.30},
        {"model": "a", "patch_size": 8, "gflops": 4.0, "AP": 0.30},  # a tie: the cheaper p16 is named
        {"model": "b", "patch_size": 16, "gflops": 1.0, "AP": 0.20},
        {"model": "b", "patch_size": 8, "gflops": 4.0, "AP": 0.25},
    ]
    eval_tool.mark_best(rows, "AP")
    assert [r["best"] for r in rows] == ["yes", "", "", "yes"]


def test_unknown_config_key_lists_the_valid_ones():
    config = load_config(RUNLOCAL)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stepz'.*steps"):
        apply_overrides(config, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian.steps'"):
        apply_overrides(config, ["trian.steps=3"])
    assert apply_overrides(config, ["train.steps=7", "patch_sizes.sizes=[8, 6]"]).patch_sizes.sizes == [8, 6]


@pytest.mark.parametrize(
    "spec",
    [
        "configs/classification/fashion_mnist.py:runlocal,fixd=8",
        "configs/contrastive/fashion_mnist.py:mode=lit,towr=vit16",
        "configs/segmentation/scenes.py:runlocal,scrach",
    ],
)
def test_a_misspelt_config_argument_is_refused_not_ignored(spec):
    typo = spec.rsplit(",", 1)[1].split("=")[0]
    with pytest.raises(ValueError, match=rf"unknown config argument\(s\) \['{typo}'\]; this config takes \["):
        load_config(spec)


@needs_fashion_mnist
def test_patch_size_that_does_not_fit_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.patch_sizes: patch size 32 does not fit the 24x24 images"):
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "eval.patch_sizes=[8, 32]"])


def test_missing_dataset_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--set", f"data.root='{missing}'"])


def test_corrupt_image_is_named(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(20):
                Image.new("RGB", (24, 24), (i * 10, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "5.png").write_bytes(b"\x89PNG not really")
    overrides = [
        "data.name=imagefolder",
        f"data.root='{tmp_path / 'data'}'",
        "train.steps=3",
        "data.train_examples=None",
        "data.val_examples=None",
    ]
    with pytest.raises(ValueError, match=r"cannot read image .*train/a/5\.png"):
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--set", *overrides])


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = classification.mixed_cross_entropy
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(classification, "mixed_cross_entropy", exploding)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 3 .*ckpt_00000002\.pt"):
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "train.steps=4"])
    state = torch.load(tmp_path / "checkpoints" / "ckpt_00000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@needs_fashion_mnist
def test_distillation_student_starts_at_the_flexified_teacher(tmp_path):
    # A fixed p8 teacher (the runlocal shape), then a FlexiViT student initialised from it (Sec. 3.5).
    teacher_dir = tmp_path / "teacher"
    train.main(["--config", "configs/classification/fashion_mnist.py:runlocal,fixed=8", "--workdir", str(teacher_dir),
                "--set", "train.steps=2"])  # fmt: skip
    student_dir = tmp_path / "student"
    config = f"configs/classification/fashion_mnist_distill.py:runlocal,teacher={teacher_dir}"
    results = train.main(
        ["--config", config, "--workdir", str(student_dir), "--set", "train.steps=1", "optim.lr=1e-30"]
    )  # no visible update
    teacher = flexivit.load_model(teacher_dir / "checkpoints" / "ckpt_00000002.pt")
    student = final_weights(student_dir)
    assert student["patch_embed.proj.weight"].shape[-2:] == (16, 16)  # the student's underlying kernel
    torch.testing.assert_close(
        student["patch_embed.proj.weight"], flexivit.pi_resize_patch_embed(teacher.patch_embed.proj.weight, 16)
    )
    grid = teacher.posemb_grid
    want_pe = flexivit.resize_posemb(teacher.pos_embed.view(1, *grid, -1), 7).reshape(1, 49, -1)
    torch.testing.assert_close(student["pos_embed"], want_pe)
    torch.testing.assert_close(student["blocks.0.mlp.fc1.weight"], teacher.blocks[0].mlp.fc1.weight)
    assert set(results) == {12, 8, 6}


# ------------------------------------------------------------------------------------------ accumulation, collectives


@needs_fashion_mnist
def test_gradient_accumulation_gives_the_whole_batch_gradients():
    torch.manual_seed(0)
    config = load_config(RUNLOCAL)
    train_set, train_tf, _, classes = classification.build_datasets(config.data)
    model = classification.build_model(config.model, classes)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would give the backbone zero gradients
    items = [train_set[i] for i in range(32)]
    batch = [torch.stack([train_tf(image) for image, _ in items]), torch.tensor([label for _, label in items])]

    loss_fn = classification.make_loss(config, None)

    def grads(accum):
        model.zero_grad(set_to_none=True)
        loss, terms = train.accumulate_gradients(
            model,
            lambda mb: loss_fn(model, mb, 8, 0),
            batch,
            accum,
            autocast=contextlib.nullcontext,
        )
        return loss, terms, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss1, terms1, whole = grads(1)
    for accum in (2, 4):
        loss, terms, parts = grads(accum)
        torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(terms["ce"], terms1["ce"], rtol=1e-6, atol=1e-6)
        for name in whole:
            torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert whole["patch_embed.proj.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="a batch of 32 examples does not split into 3 equal micro-batches"):
        train.split_batch(batch, 3)


@needs_fashion_mnist
def test_batch_that_does_not_divide_into_micro_batches_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size 32 must divide into 1 process\(es\) x optim.accum_steps 3"):
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "optim.accum_steps=3"])


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_two_process_gradient_accumulation_equals_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525",
           str(ROOT / "tests" / "ddp_accumulation.py"), str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # Relative to the largest gradient (50 here): float32 rounding of the all-reduced mean gives ~1.5e-7.
    scale = result["gradient_scale"]
    assert scale > 1e-3 and set(result["differences"]) == {"1", "2"}
    assert all(difference / scale < 1e-6 for difference in result["differences"].values()), result


@needs_fashion_mnist
def test_collectives_get_tensors_on_the_device_the_engine_trains_on(tmp_path, monkeypatch):
    # NCCL refuses CPU tensors: every tensor the engine (patch-size check, loss and metric sums, the replica checksum,
    # the evaluators) hands to torch.distributed must be on the backend's device, which is the training device.
    # Recorded in a one-process gloo group, in which the engine runs all of its collectives.
    seen = []

    def recording(name, real):
        def collective(tensors, *args, **kwargs):
            for t in tensors if isinstance(tensors, list) else [tensors]:
                seen.append((name, t.device))
            for arg in args:
                for t in arg if isinstance(arg, list) else [arg]:
                    if isinstance(t, torch.Tensor):
                        seen.append((name, t.device))
            return real(tensors, *args, **kwargs)

        return collective

    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all", "reduce"):
        monkeypatch.setattr(dist, name, recording(name, getattr(dist, name)))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--set", "train.steps=2"])
        engine_device = distributed.init()[2]
        backend_device = distributed.collective_device()
    finally:
        dist.destroy_process_group()
    # Per step: the loss sum, which carries the patch-size check (1); at the end the checksum check (2), the eval sums.
    assert len(seen) >= 2 * 1 + 3, seen
    assert {device for _, device in seen} == {engine_device} == {backend_device}, seen


def test_collective_device_under_nccl_is_the_ranks_gpu(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


# ------------------------------------------------------------------------------------------ durability, resume, files


def test_atomic_write_is_durable_and_has_ordinary_permissions(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "out" / "file.json"
    atomic_write_text(target, "new")
    tmp_name = events[0][1]
    assert events == [("fsync", tmp_name), ("replace", str(target)), ("fsync", str(target.parent))]
    assert Path(tmp_name).parent == target.parent and target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]  # no temporary left


def test_a_crash_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    config_path = tmp_path / "config.json"
    save_config(load_config(RUNLOCAL), config_path)
    before = config_path.read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_config(apply_overrides(load_config(RUNLOCAL), ["train.steps=99"]), config_path)
    assert config_path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@needs_fashion_mnist
def test_old_checkpoints_are_deleted_only_after_the_new_one_is_durable(tmp_path, monkeypatch):
    events = []
    real_fsync, real_unlink = os.fsync, Path.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (events.append(("unlink", str(self))),
                                                               real_unlink(self, *a, **k))[1])  # fmt: skip
    train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "train.steps=3", "train.ckpt_every=1",
                "train.keep_ckpts=1"])  # fmt: skip
    folder = str(tmp_path / "checkpoints")
    deleted = [i for i, e in enumerate(events) if e[0] == "unlink" and "ckpt_00000001" in e[1]]
    synced = [i for i, e in enumerate(events) if e == ("fsync", folder)]
    assert deleted and synced and synced[1] < deleted[0]  # the folder synced after ckpt 2's rename, then 1 deleted
    assert [p.name for p in Path(folder).iterdir()] == ["ckpt_00000003.pt"]


@needs_fashion_mnist
def test_resume_refuses_a_different_config_but_allows_explicit_overrides(tmp_path):
    workdir = str(tmp_path)
    train.main(["--config", RUNLOCAL, "--workdir", workdir, "--set", "train.steps=2"])
    other = "configs/classification/fashion_mnist.py:runlocal,fixed=8"
    with pytest.raises(ConfigError, match=r"(?s)differs from the one saved.*patch_sizes.kind: 'uniform' -> 'fixed'"):
        train.main(["--config", other, "--workdir", workdir, "--resume", "--set", "train.steps=3"])
    with pytest.raises(ConfigError, match=r"train.steps: 2 -> 4"):  # the saved run had 2 steps; the file says 4
        train.main(["--config", RUNLOCAL, "--workdir", workdir, "--resume"])
    train.main(["--config", RUNLOCAL, "--workdir", workdir, "--resume", "--set", "train.steps=3", "optim.lr=0.002"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["optim"]["lr"] == 0.002
    assert (tmp_path / "checkpoints" / "ckpt_00000003.pt").exists()


@needs_fashion_mnist
def test_resume_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, capsys):
    common = ["--config", RUNLOCAL, "--set", "train.steps=4", "train.ckpt_every=2"]
    train.main([*common, "--workdir", str(tmp_path / "straight")])
    train.main([*common, "--workdir", str(tmp_path / "resumed")])
    newest = tmp_path / "resumed" / "checkpoints" / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk that filled up mid-write, on another tool's rename
    with pytest.warns(UserWarning, match=rf"cannot resume from {re.escape(str(newest))}.*truncated"):
        train.main([*common, "--workdir", str(tmp_path / "resumed"), "--resume"])
    assert "ckpt_00000002.pt at step 2" in capsys.readouterr().out
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))


@needs_fashion_mnist
def test_eval_of_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("results of last week\n" * 10)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(text))}: .*expected a torch.save\(\) file"):
        eval_tool.main(["--checkpoint", str(text), "--config", RUNLOCAL, "--no-timing"])
