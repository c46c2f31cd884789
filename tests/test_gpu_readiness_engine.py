"""The engine on a GPU it has never seen, guarded on the CPU (issue 26): no host-device synchronisation in a step that
neither logs nor checkpoints, the problems such a step used to catch at once (a non-finite loss, ranks that disagree
on the patch size) caught at the next read, out of memory at the most expensive patch size found at start-up, the TF32
policy, pinned and worker-fed loaders."""

import contextlib
import dataclasses
import json
import random
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from markers import needs_fashion_mnist

import flexivit
from tasks import classification
from tasks.common import distributed, loader, precision
from tools import train

RUNLOCAL = "configs/classification/fashion_mnist.py:runlocal"
# What waits for the GPU when the tensor is on it: reading a value, or truth-testing one in an `if`.
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy")


@contextlib.contextmanager
def step_hook(monkeypatch):
    """Yields a dict whose "step" is the step whose loss the engine last computed (None before the first)."""
    current = {"step": None}
    real_make_loss = classification.TASK.make_loss

    def make_loss(config, info, teacher=None):
        real_loss = real_make_loss(config, info, teacher)

        def loss(net, batch, patch, step):
            current["step"] = step
            return real_loss(net, batch, patch, step)

        return loss

    monkeypatch.setattr(classification, "TASK", dataclasses.replace(classification.TASK, make_loss=make_loss))
    yield current


def record_reads(monkeypatch, current, optimizers) -> list:
    """Every read of a tensor value while ``current["step"]`` is set, with where it came from.

    Two kinds are left out because they are CPU tensors on a GPU run too: the data pipeline's (its transforms run in
    the loader, in workers once data.num_workers > 0) and torch.optim's step counters (kept on the CPU unless
    ``capturable``)."""
    reads = []

    def wrapped(name, real):
        def read(self, *args, **kwargs):
            if current["step"] is not None:
                stack = traceback.extract_stack()[:-1]
                in_loader = any("torch/utils/data" in frame.filename for frame in stack)
                counter = any(self is state.get("step") for opt in optimizers for state in opt.state.values())
                if not in_loader and not counter:
                    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-5:]))
                    reads.append((current["step"], name, where))
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrapped(name, getattr(torch.Tensor, name)))
    return reads


def capture_optimizer(monkeypatch) -> list:
    optimizers = []
    real_build = train.build_optimizer

    def build(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(train, "build_optimizer", build)
    return optimizers


# ------------------------------------------------------------------------------------------ host-device sync


@needs_fashion_mnist
@pytest.mark.parametrize("group", [False, True], ids=["one process", "one-process gloo group"])
def test_a_step_that_neither_logs_nor_checkpoints_reads_nothing_off_the_device(tmp_path, monkeypatch, group):
    # Steps 0-2 of 4 neither log, evaluate nor checkpoint; step 3 (the last) does all three. In a process group the
    # patch-size agreement check runs too. Before issue 26, each step read the loss twice (`if not isfinite`, the
    # progress bar) and the Ctrl-C flag once, and compared the patch sizes on the host.
    with step_hook(monkeypatch) as current:
        optimizers = capture_optimizer(monkeypatch)
        reads = record_reads(monkeypatch, current, optimizers)
        args = ["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--set", "train.steps=4",
                "train.log_every=10", "train.ckpt_every=10", "eval.final=False"]  # fmt: skip
        if group:
            dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        try:
            train.main(args)
        finally:
            current["step"] = None  # recording ends here
            if group:
                dist.destroy_process_group()
    quiet = [r for r in reads if r[0] in (0, 1, 2)]  # from step s's loss to step s+1's: the whole of steps 0-2
    assert quiet == [], "\n".join(map(str, quiet))
    assert any(r[0] == 3 for r in reads)  # the instrument works: the last step reads the loss for the log
    assert optimizers and len(optimizers[0].state) > 0  # AdamW's step counters were there to be left out


@needs_fashion_mnist
def test_a_non_finite_loss_between_reads_stops_at_the_next_read_and_is_never_checkpointed(tmp_path, monkeypatch):
    real_loss = classification.mixed_cross_entropy
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 4 and 5

    monkeypatch.setattr(classification, "mixed_cross_entropy", exploding)
    args = ["--set", "train.steps=6", "train.log_every=3", "train.ckpt_every=3"]
    with pytest.raises(FloatingPointError) as error:
        train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), *args])
    message = str(error.value)
    assert "non-finite loss nan at step 4 (patch size" in message  # the first bad step, not the step that read it
    assert "steps 4-4 updated the weights" in message and "stopped before step 5's update" in message
    assert message.endswith("ckpt_00000003.pt") and "\n" not in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000003.pt"]  # nothing after step 4
    state = torch.load(tmp_path / "checkpoints" / "ckpt_00000003.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@needs_fashion_mnist
def test_ranks_that_disagree_on_the_patch_size_are_stopped_at_the_next_read(tmp_path, monkeypatch):
    # One process cannot disagree with itself, so the sum over "ranks" is faked: at step 2 another rank trained at
    # another patch size (the step's all-reduce then sums to more than world x this rank's value).
    with step_hook(monkeypatch) as current:
        real_sum, faked = distributed.all_reduce_sum, []

        def other_rank_elsewhere(values):
            summed = real_sum(values)
            if current["step"] == 2 and not faked:  # the step's all-reduce: [loss, *terms, Ctrl-C, step, ph, pw]
                faked.append(True)
                summed = summed + torch.nn.functional.one_hot(torch.tensor(len(values) - 1), len(values)) * 4.0
            return summed

        monkeypatch.setattr(distributed, "all_reduce_sum", other_rank_elsewhere)
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        try:
            with pytest.raises(RuntimeError, match=r"patch size differs between processes from step 2 on: rank 0"):
                train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path / "w"), "--set", "train.steps=6",
                            "train.log_every=4", "train.ckpt_every=4"])  # fmt: skip
        finally:
            dist.destroy_process_group()
        assert current["step"] == 3  # caught at step 3's read (done = 4), before its checkpoint
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------ memory check


class WithBuffer(torch.nn.Module):
    """A model whose forward changes a buffer (as BatchNorm's running statistics or a VQ dictionary do) and draws."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x, patch_size):
        self.seen += 1
        return self.linear(torch.nn.functional.dropout(x, 0.5, training=True)) * patch_size


def test_the_memory_check_leaves_weights_gradients_buffers_and_random_states_as_they_were():
    torch.manual_seed(0)
    model = WithBuffer()
    batch = [torch.randn(8, 4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    def loss_fn(net, batch, patch, step):
        np.random.rand(), random.random()  # a task drawing from numpy / Python's RNGs
        return net(batch[0], patch).square().mean(), {"terms": torch.ones(())}

    train.memory_check(model, model, loss_fn, batch, patch=2, step=0, accum=2,
                       autocast=contextlib.nullcontext, device=torch.device("cpu"))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the buffer too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


@needs_fashion_mnist
def test_a_run_with_the_memory_check_ends_bit_identical_to_one_without(tmp_path, monkeypatch):
    seen = {}
    real_check = train.memory_check

    def recording(*args, **kwargs):
        seen["patch"] = kwargs["patch"]
        return real_check(*args, **kwargs)

    monkeypatch.setattr(train, "memory_check", recording)
    common = ["--config", RUNLOCAL, "--set", "train.steps=3", "train.ckpt_every=3", "eval.final=False"]
    train.main([*common, "train.memory_check=True", "--workdir", str(tmp_path / "checked")])
    assert seen == {"patch": 6}  # the runlocal sampler's 12 / 8 / 6: the most tokens at 6
    train.main([*common, "train.memory_check=False", "--workdir", str(tmp_path / "plain")])
    a, b = (
        torch.load(tmp_path / w / "checkpoints" / "ckpt_00000003.pt", weights_only=True) for w in ("checked", "plain")
    )
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    logs = [(tmp_path / w / "log.jsonl").read_text().splitlines() for w in ("checked", "plain")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "train/steps_per_s"} for line in log] for log in logs]
    assert strip[0] == strip[1] and len(strip[0]) == 3


@needs_fashion_mnist
def test_out_of_memory_at_the_smallest_patch_fails_at_start_up_in_one_line(tmp_path, monkeypatch, capsys):
    real_forward = flexivit.FlexiViT.forward

    def forward(self, images, patch_size=None, **kwargs):
        if patch_size == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 21.00 GiB (GPU 0; 79.1 GiB)")
        return real_forward(self, images, patch_size, **kwargs)

    monkeypatch.setattr(flexivit.FlexiViT, "forward", forward)
    workdir = tmp_path / "w"
    args = ["--config", RUNLOCAL, "--workdir", str(workdir), "--set", "patch_sizes.sizes=[12, 8, 4]",
            "eval.patch_sizes=[8]", "train.memory_check=True", "optim.accum_steps=2"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train.cli(args)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert "out of memory on cpu at patch size 4" in err and "32 images per process in 2 micro-batch(es) of 16" in err
    assert all(key in err for key in ("train.grad_checkpointing=True", "optim.accum_steps", "train.batch_size"))
    assert "Tried to allocate 21.00 GiB" in err
    assert not workdir.exists() or not any(workdir.iterdir())  # at start-up: no file written


def test_an_error_that_is_not_out_of_memory_is_not_renamed():
    def loss_fn(net, batch, patch, step):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train.memory_check(model, model, loss_fn, [torch.zeros(2, 2)], patch=4, step=0, accum=1,
                           autocast=contextlib.nullcontext, device=torch.device("cpu"))  # fmt: skip


# ------------------------------------------------------------------------------------------ TF32, loaders


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_is_on_for_fp32_on_a_gpu_unless_turned_off(tf32_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.use_tf32("fp32") is True and flags() == (True, True)
    assert torch.get_float32_matmul_precision() == "high"  # the same setting, seen from the other API
    assert precision.use_tf32("fp32", allowed=False) is False and flags() == (False, False)
    precision.use_tf32("fp32")
    assert precision.use_tf32("bf16") is False and flags() == (False, False)  # autocast's matmuls are bf16 already
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.use_tf32("tf32")


def test_tf32_is_left_alone_without_a_gpu(tf32_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's defaults
    assert precision.use_tf32("fp32") is False and flags() == (False, True)


def test_the_train_loader_pins_on_request_and_keeps_its_workers():
    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    pinned = loader.train_loader(data, None, global_batch=4, seed=0, rank=0, world=1, start_step=0,
                                 num_workers=1, pin_memory=True)  # fmt: skip
    assert pinned.pin_memory and pinned.persistent_workers
    plain = loader.train_loader(data, None, global_batch=4, seed=0, rank=0, world=1, start_step=0)
    assert not plain.pin_memory and plain.num_workers == 0  # the CPU default, as before


def test_evaluation_loaders_take_the_engines_workers_within_its_evaluations():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    assert (loader.eval_loader(data, batch_size=4).num_workers, loader.eval_loader(data, batch_size=4).pin_memory) == (
        0,
        False,
    )
    with loader.eval_loading(num_workers=2, pin_memory=True):
        inside = loader.eval_loader(data, batch_size=4)
        explicit = loader.eval_loader(data, batch_size=4, num_workers=1)
    assert (inside.num_workers, inside.pin_memory, explicit.num_workers) == (2, True, 1)
    after = loader.eval_loader(data, batch_size=4)
    assert (after.num_workers, after.pin_memory) == (0, False)  # put back


@needs_fashion_mnist
def test_the_engine_evaluates_with_data_num_workers_and_sets_tf32_from_the_config(tmp_path, monkeypatch):
    seen = {}
    real_evaluate, real_tf32 = classification.TASK.evaluate, train.use_tf32

    def evaluate(*args, **kwargs):
        seen["eval_loading"] = dict(loader._EVAL_LOADING)
        return real_evaluate(*args, **kwargs)

    def use_tf32(*args, **kwargs):
        seen["tf32"] = (args, kwargs)
        return real_tf32(*args, **kwargs)

    monkeypatch.setattr(classification, "TASK", dataclasses.replace(classification.TASK, evaluate=evaluate))
    monkeypatch.setattr(train, "use_tf32", use_tf32)
    train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path), "--set", "train.steps=1", "data.num_workers=1",
                "train.tf32=False", "eval.patch_sizes=[8]"])  # fmt: skip
    assert seen["eval_loading"] == {"num_workers": 1, "pin_memory": False}  # a CPU run: nothing to pin for
    assert seen["tf32"] == (("fp32",), {"allowed": False})


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_takes_the_same_step(name):
    # The engine asks for the fused kernels on CUDA (the scaler's inf check then stays on the device); on the CPU,
    # where torch has them too, the fused step must equal the plain one.
    from tasks.common.optim import build_optimizer

    steps = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        optimizer = build_optimizer(model, name=name, lr=0.1, weight_decay=0.01, fused=fused)
        assert optimizer.defaults.get("fused") is (True if fused else None)
        for _ in range(3):
            model(torch.ones(2, 8)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        steps[fused] = model.weight.detach().clone()
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-6, atol=1e-7)
