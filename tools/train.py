"""Train any task on a FlexiViT backbone, with a fixed or a random patch size per step (paper Sec. 3.3).

    python -m tools.train --config configs/classification/fashion_mnist.py --workdir runs/fmnist
    python -m tools.train --config configs/classification/fashion_mnist.py:runlocal --workdir /tmp/x
    python -m tools.train --workdir runs/fmnist --resume           # continue from the last checkpoint
    python -m tools.train --config ... --workdir runs/fmnist --overwrite   # delete the run there, start anew
    torchrun --nproc_per_node 2 -m tools.train --config ... --workdir ...   # data parallel, same command

The workdir holds one run (tasks/common/workdir.py): nothing is written into it until the config is valid and, on
``--resume``, the checkpoint is loaded, so a failed start changes no file (running out of memory at the most
expensive patch size included: ``memory_check`` runs it first). Ctrl-C stops at the end of the current step (with
several processes, at the next log or checkpoint step, where they agree on it), saves a checkpoint there and prints
the command that resumes (a second Ctrl-C stops at once).

One linear loop. The patch size of step ``s`` comes from ``sampler(s)`` with the sampler seeded by the config,
so every rank uses the same size and a resumed run repeats the same sequence; the data order and the
augmentation are functions of ``(seed, step)`` too (tasks/common/loader.py), so an interrupted run resumed from a
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import flexivit
from flexivit.checkpoint import load_state_dict
from flexivit.convert import flexify_state_dict
from flexivit.files import atomic_write_text
from tasks import TaskError, check_engine_features, get_task
from tasks.common import distributed
from tasks.common import workdir as run_dir
from tasks.common.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_config,
    config_differences,
    load_config,
    save_config,
)
from tasks.common.loader import eval_loading, train_loader
from tasks.common.optim import build_optimizer, build_scheduler, freeze
from tasks.common.precision import autocast, use_tf32
from tasks.common.precision import autocast_dtype as dtype_of
from tasks.common.train_state import load_latest_train_state, resolve_checkpoint, save_train_state
from tasks.common.transforms import InputRenormalization, as_value_range
from tasks.common.writers import MetricWriter
from tools.lib.guards import CtrlC, StepChecks, device_scalar


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="configs/<task>/<name>.py[:arg]; optional with --resume")
    parser.add_argument("--workdir", required=True, help="where config, logs and checkpoints go")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run --workdir holds (checkpoints, logs, results) first"
    )
    parser.add_argument("--interrupt-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash
    return parser.parse_args(argv)


def resolve_config(args, resume: bool) -> Config:
    """The run's config: ``--config`` (or, resuming, the workdir's ``config.json``) with the ``--set`` overrides,
    checked (:func:`check_config`) before anything is written.

    Resuming with a ``--config`` whose resolved values differ from the saved ones is refused, listing the differences,
    unless each differing key is one of the explicit ``--set`` overrides (e.g. more steps): a resumed run must not
    silently continue as another experiment.
    """
    saved_path = Path(args.workdir) / "config.json"
    saved = None
    if resume and saved_path.exists():
        try:
            saved = run_dir.read_config(saved_path)
        except ConfigError as error:
            if not args.config:
                raise
            print(f"warning: {error}: resuming with --config {args.config}", flush=True)
    if args.config:
        config = apply_overrides(load_config(args.config), args.set)
    elif saved is not None:
        config = apply_overrides(saved, args.set)
    else:
        raise ConfigError("--config is required (or --resume with a workdir that holds config.json)")
    if saved is not None:
        explicit = [item.partition("=")[0].strip() for item in args.set]
        differences = [
            line
            for key, line in config_differences(saved, config)
            if not any(key == k or key.startswith(k + ".") for k in explicit)
        ]
        if differences:
            raise ConfigError(
                f"--resume: the config differs from the one saved in {saved_path}:\n  "
                + "\n  ".join(differences)
                + "\nResume without --config to continue the saved run, change such keys explicitly with --set, or "
                "start the new config in a new --workdir."
            )
    check_config(config)
    return config


def build_teacher(distill, value_range, device) -> torch.nn.Module:
    """A frozen teacher in eval mode: a registered model with ``init`` weights, or a checkpoint of ours.

    It gets its own input normalisation (``distill.value_range``, e.g. "imagenet" for a DeiT-III teacher from timm)
    from the student's ``value_range``.
    """
    if distill.name:
        init = resolve_checkpoint(distill.init) if distill.init else None
        teacher = flexivit.create_model(distill.name, pretrained=init, **(distill.overrides or {}))
    else:
        teacher = flexivit.load_model(resolve_checkpoint(distill.init))
    if distill.value_range is not None and as_value_range(distill.value_range) != as_value_range(value_range):
        teacher = InputRenormalization(teacher, value_range, distill.value_range)
    return teacher.to(device).eval().requires_grad_(False)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the global torch RNG at training step ``step`` on ``rank``.

    Every random draw of a step (mixup, drop-path, dropout) comes from the RNG seeded here, so it is a function of
    (seed, step, rank) alone: a resumed run draws what the uninterrupted run drew, on every rank, whatever else
    consumed random numbers in between (the DataLoader's base seed, an evaluation).
    """
    return int(np.random.SeedSequence([seed, step, rank, 0x5EED]).generate_state(1, np.uint64)[0] >> 1)


def split_batch(batch: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """``parts`` equal micro-batches of a rank's batch (gradient accumulation)."""
    size = len(batch[0])
    if size % parts:
        raise ValueError(f"a batch of {size} examples does not split into {parts} equal micro-batches")
    return [[t[i * (size // parts) : (i + 1) * (size // parts)] for t in batch] for i in range(parts)]


def accumulate_gradients(net, loss_fn, batch: list[torch.Tensor], accum: int, *, autocast, scaler=None):
    """Backward of ``loss_fn(micro_batch) -> (loss, metrics)`` over ``accum`` equal micro-batches; returns the mean
    loss and metrics (detached). Each micro-batch's loss is weighted ``1 / accum``: with equal micro-batches the
    gradient is that of the whole batch (for losses that average over examples). Under DDP the gradients are
    all-reduced in the last micro-batch's backward only. The backward runs outside autocast.
    """
    total, metrics = None, {}
    for micro, micro_batch in enumerate(split_batch(batch, accum)):
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with autocast():
                loss, terms = loss_fn(micro_batch)
            (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
        total = loss.detach() / accum if total is None else total + loss.detach() / accum
        for key, value in terms.items():
            metrics[key] = metrics.get(key, 0.0) + device_scalar(value, loss).detach().float() / accum
    return total, metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    # Read-only until the run starts below: a refused or failed start leaves the workdir as it was.
    mode = run_dir.check_workdir(workdir, resume=args.resume, overwrite=args.overwrite, has_config=bool(args.config))
    config = resolve_config(args, resume=mode == "resume")
    rank, _, device = distributed.init()
    world = distributed.world_size()
    main_process = distributed.is_main()
    task = get_task(config.task)
    check_engine_settings(config, world, device)
    check_engine_features(task, config)  # a setting the task would ignore is refused by name
    torch.manual_seed(config.seed + rank)
    train_cfg, optim_cfg, eval_cfg = config.train, config.optim, config.eval

    # ------------------------------------------------------------------------------------------ input pipeline
    train_set, train_tf, val_set, info = task.build_datasets(config.data, distill=config.distill)

    # ------------------------------------------------------------------------------------------ model
    model = task.build_model(config.model, info)
    teacher = None
    if config.distill:
        teacher = build_teacher(config.distill, config.data.value_range, device)
        if config.distill.init_student:
            # Sec. 3.5: start the student at the teacher: kernel PI-resized, posemb resized to the underlying sizes.
            weights = flexify_state_dict(_unwrap(teacher).state_dict(), model, source="teacher")
            load_state_dict(model, weights, source="teacher")
    loss_fn = task.make_loss(config, info, teacher)  # reads the config once: no step reads it
    freeze(model, optim_cfg.frozen)
    # Counted after the task built the model: a task may freeze parameters itself (LiT locks its image tower).
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if train_cfg.grad_checkpointing:  # every tower that can (FlexiViTs, text transformers), whatever the task
        for module in model.modules():
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(True)
    model.to(device)
    sampler = flexivit.build_sampler(**{"seed": config.seed, **config.patch_sizes})
    eval_patches = [p if isinstance(p, int) else tuple(p) for p in eval_cfg.patch_sizes]

    # ------------------------------------------------------------------------------------------ optimisation
    optimizer = build_optimizer(
        model,
        name=optim_cfg.name,
        lr=optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
        momentum=optim_cfg.momentum,
        betas=optim_cfg.betas,
        lr_mults=optim_cfg.lr_mults,
        fused=device.type == "cuda",
    )
    scheduler = build_scheduler(
        optimizer,
        total_steps=train_cfg.steps,
        warmup_steps=optim_cfg.warmup_steps,
        kind=optim_cfg.schedule,
        end_factor=optim_cfg.end_factor,
    )
    precision = train_cfg.precision
    autocast_dtype = dtype_of(precision, device)  # warns where bf16 is emulated (V100, T4)
    # fp32 on a GPU: TF32 matmuls unless train.tf32=False (.get: a run saved before the key existed resumes)
    tf32 = use_tf32(precision, allowed=train_cfg.get("tf32", True))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    accum = optim_cfg.accum_steps
    start_step = 0
    if mode == "resume":
        found = load_latest_train_state(workdir, model, optimizer, scheduler, scaler)
        if found is not None:
            found, start_step = found
            if main_process:
                print(f"resumed from {found} at step {start_step}", flush=True)

    # ------------------------------------------------------------------------------------------ data parallel, loader
    net = model
    if world > 1:
        # No buffer broadcast before every forward: the only buffers that change (the VQ dictionary's EMA) are
        # all-reduced in their own update, so ranks stay equal without it (DDP's constructor syncs them once).
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if train_cfg.compile:
        # One graph per patch size (shapes are static within a step); the cache limit bounds recompilation.
        torch._dynamo.config.cache_size_limit = max(64, 4 * len(sampler.sizes))
        net = torch.compile(net, dynamic=False)

    loader = train_loader(
        train_set,
        train_tf,
        global_batch=train_cfg.batch_size,
        seed=config.seed,
        rank=rank,
        world=world,
        start_step=start_step,
        num_workers=config.data.num_workers,
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",  # so that the copies below are asynchronous
    )
    batches = iter(loader)

    # ------------------------------------------------------------------------------------------ memory check
    # Before the run starts: running out of memory at start-up changes no file.
    model.train()
    if len(sampler.sizes) > 1 and _memory_check_on(train_cfg.get("memory_check"), device):
        first = next(batches)
        batches = itertools.chain([first], batches)  # the loop still trains on it
        memory_check(
            net,
            model,
            loss_fn,
            [t.to(device, non_blocking=True) for t in first],
            patch=min(sampler.sizes, key=lambda p: np.prod(flexivit.pi_resize.to_2tuple(p))),  # the most tokens
            step=start_step,
            accum=accum,
            autocast=lambda: autocast(device, autocast_dtype),
            device=device,
        )

    # ------------------------------------------------------------------------------------------ the run starts
    distributed.barrier()  # every rank has checked the workdir before the main process writes into it

    def start_run():  # --overwrite's deletion, leftover temp files, logs cut back to the checkpoint; the config
        run_dir.start(workdir, mode, start_step)
        save_config(config, workdir / "config.json")

    distributed.on_main(start_run)  # a failure there (a full disk) ends every rank with its message
    writer = MetricWriter(workdir, enabled=main_process, start_step=start_step)
    if main_process:
        print(
            f"{config.task}: {len(train_set)} train / {len(val_set)} val examples; "
            f"model {config.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
            f"{len(frozen)} frozen); patch sizes {sampler}; {world} process(es) on {device}"
            + (f"; {precision}, TF32 matmuls {'on' if tf32 else 'off'}" if device.type == "cuda" else ""),
            flush=True,
        )

    def run_eval(step: int) -> dict:
        with eval_loading(num_workers=config.data.num_workers, pin_memory=device.type == "cuda"):
            results = task.evaluate(model, val_set, eval_patches, device, autocast_dtype, eval_cfg.batch_size)
        if main_process:
            writer.write(
                step, {f"eval/{k}_p{_name(p)}": v for p, r in results.items() for k, v in r.items() if k != "n"}
            )
            atomic_write_text(
                workdir / "eval.json", json.dumps({"step": step, "results": _jsonable(results)}, indent=2)
            )
        return results

    # ------------------------------------------------------------------------------------------ train loop
    # No step reads a value off the device (a read waits until the GPU has run everything queued, so the host could
    # not queue the next step meanwhile): the loss, the Ctrl-C flag and the patch-size check travel in one all-reduce,
    # and the values are read on log, checkpoint and evaluation steps only (`checks`); a non-finite loss stops the run
    # at the next of them, before its update and before any checkpoint.
    progress = _progress(start_step, train_cfg.steps, main_process)
    checks = StepChecks(device)
    t_last, results, done = time.perf_counter(), {}, start_step
    resume_command = f"python -m tools.train --workdir {workdir} --resume"
    with CtrlC(workdir, resume_command) as ctrl_c:
        for step in range(start_step, train_cfg.steps):
            patch = sampler(step)  # the same on every rank: a function of (seed, step) only
            batch = [t.to(device, non_blocking=True) for t in next(batches)]
            torch.manual_seed(step_seed(config.seed, step, rank))

            def micro_loss(micro_batch, patch=patch, step=step):
                return loss_fn(net, micro_batch, patch, step)

            step_loss, terms = accumulate_gradients(
                net, micro_loss, batch, accum, autocast=lambda: autocast(device, autocast_dtype), scaler=scaler
            )
            # One all-reduce for the loss, its terms, whether any rank got Ctrl-C (so every rank stops after the same
            # step) and, in a process group, the step and patch size: the paper's "one patch size per step on all
            # ranks", checked as sum over ranks == world x this rank's value (each < 2^12: exact in float32).
            n = len(terms)
            local = [step_loss.float(), *terms.values(), device_scalar(float(ctrl_c.requested), step_loss)]
            if distributed.is_initialized():
                local += [device_scalar(v, step_loss) for v in (step % 4096, *flexivit.pi_resize.to_2tuple(patch))]
            local = torch.stack(local)
            summed = distributed.all_reduce_sum(local)
            reduced = summed / world
            mean_loss, terms = reduced[0], dict(zip(terms, reduced[1 : 1 + n], strict=True))
            mismatch = (summed[2 + n :] != world * local[2 + n :]).any() if distributed.is_initialized() else None
            checks.record(step, patch, mean_loss, mismatch)

            done = step + 1
            log_now = done % train_cfg.log_every == 0 or done == train_cfg.steps
            eval_now = bool(eval_cfg.every) and done % eval_cfg.every == 0 and done != train_cfg.steps
            ckpt_now = done % train_cfg.ckpt_every == 0 or done == train_cfg.steps
            # Ctrl-C: one process stops after this step; a process group after the next step that reads the flag.
            stop = world == 1 and ctrl_c.requested
            if log_now or eval_now or ckpt_now or stop:
                any_rank_stops = checks.read(step, stop_flag=summed[1 + n], workdir=workdir)  # raises on a problem
                stop = stop or any_rank_stops
                ckpt_now = ckpt_now or stop
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], optim_cfg.clip_norm or float("inf")
            )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            if main_process and log_now:
                now = time.perf_counter()
                loss_value = mean_loss.item()
                writer.write(
                    done,
                    {
                        "train/loss": loss_value,
                        **{f"train/{k}": v.item() for k, v in terms.items()},
                        "train/patch_size": _name(patch),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm.item(),
                        "train/steps_per_s": train_cfg.log_every / max(now - t_last, 1e-9),
                    },
                )
                t_last = now
                progress.set_postfix(loss=f"{loss_value:.3f}", p=_name(patch), refresh=False)
            if main_process:
                writer.record_patch(done, patch)
                progress.update(1)
            if eval_now:
                run_eval(done)
            if ckpt_now:
                distributed.on_main(
                    save_train_state,
                    workdir,
                    done,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    config,
                    keep=train_cfg.keep_ckpts,
                    info=info,
                )
            if stop:
                writer.close()
                progress.close()
                ctrl_c.stopped(done, train_cfg.steps)
            if args.interrupt_after is not None and done == args.interrupt_after:
                writer.close()
                raise SystemExit(f"interrupted after step {done} (--interrupt-after)")

    # ------------------------------------------------------------------------------------------ final evaluation
    progress.close()
    if distributed.is_initialized():
        checksum = distributed.parameter_checksum(model)
        distributed.check_same_across_ranks([checksum], "the model weights")
        if main_process:
            writer.write(train_cfg.steps, {"replicas_identical": True, "parameter_checksum": checksum})
    results = run_eval(train_cfg.steps) if eval_cfg.final else {}
    if main_process:
        for p, r in results.items():
            print(f"patch {_name(p):>6}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "n"), flush=True)
    writer.close()
    distributed.shutdown()
    return results


class MemoryCheckError(ValueError):
    """The most expensive patch size does not fit in the device's memory at this batch size (see memory_check)."""


def memory_check(net, model, loss_fn, batch, *, patch, step: int, accum: int, autocast, device) -> None:
    """One forward and backward at ``patch`` on ``batch`` without an update, so that a recipe that fits at the
    cheap patch sizes but not at the most expensive one fails at start-up, naming the settings to change, instead
    of at the step where the sampler first draws that size (hours in).

    Numerics are unchanged: no optimizer step, the gradients set back to None (as every step leaves them), the
    buffers and the torch / numpy / Python RNG states restored; under DDP the backward skips the all-reduce.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    sync = net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), sync:
            accumulate_gradients(net, lambda mb: loss_fn(net, mb, patch, step), batch, accum, autocast=autocast)
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as error:
        text = str(error)
        if not isinstance(error, torch.cuda.OutOfMemoryError | MemoryError) and not (
            "out of memory" in text or "can't allocate memory" in text
        ):
            raise
        per_process = len(batch[0])
        raise MemoryCheckError(
            f"out of memory on {device} at patch size {_name(patch)} (the most tokens this run's sampler draws) with "
            f"{per_process} images per process in {accum} micro-batch(es) of {per_process // accum}: set "
            f"train.grad_checkpointing=True, raise optim.accum_steps, or lower train.batch_size "
            f"({text.splitlines()[0] if text else type(error).__name__})"
        ) from None
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _memory_check_on(setting: bool | None, device: torch.device) -> bool:
    """train.memory_check: None (the default) runs it on a GPU only; True / False force it."""
    return device.type == "cuda" if setting is None else setting


def check_engine_settings(config: Config, world: int, device: torch.device) -> None:
    """What the config asks of this machine and process group, checked before the first write."""
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (it uses a loss scaler); use bf16 or fp32 on CPU")
    if config.train.batch_size % (world * config.optim.accum_steps):
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} must divide into {world} process(es) x optim.accum_steps "
            f"{config.optim.accum_steps} equal micro-batches"
        )


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.model if isinstance(module, InputRenormalization) else module


def _name(patch) -> str | int:
    return patch if isinstance(patch, int) else "x".join(map(str, patch))


def _jsonable(results: dict) -> dict:
    return {str(_name(p)): r for p, r in results.items()}


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=not enabled,
        desc="train",
        dynamic_ncols=True,
        mininterval=2.0,
        file=sys.stdout if os.environ.get("FLEXIVIT_PROGRESS_STDOUT") else None,
    )


def cli(argv=None) -> None:
    """``main`` for the command line: a mistake in the command, the config or the data ends with one line naming the
    culprit (exit 2 for the command and the config, 1 otherwise); FLEXIVIT_TRACEBACK=1 shows the traceback."""
    try:
        main(argv)
    except Exception as error:
        if os.environ.get("FLEXIVIT_TRACEBACK") or not isinstance(error, ValueError | OSError | LookupError):
            raise
        usage = isinstance(error, ConfigError | run_dir.WorkdirError | TaskError)
        message = str(error) if not isinstance(error, KeyError) else str(error.args[0])
        print(f"tools.train: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2 if usage else 1) from None


if __name__ == "__main__":
    cli()
