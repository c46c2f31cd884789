"""One command that checks a GPU setup end to end and writes a markdown report (sized for five minutes on a GPU).

    python -m tools.gpu_check                                  # runs/gpu_check/report.md
    python -m tools.gpu_check --model flexivit_small --batch-size 64 --out /tmp/gpu.md
    python -m tools.gpu_check --tiny                           # seconds: a tiny model (automatic without a GPU)

The parts, each reported under its own heading (a failure is reported and the others still run; exit code 1):

(a) one training step per paper patch size (48 ... 8) in bf16 and in fp16 with the loss scaler, flash attention
    required (``sdpa_kernel([FLASH_ATTENTION])``; reported where it is unavailable), peak memory per size;
(b) the engine (``tools.train`` on fashion_mnist.py:runlocal, a few steps) in a one-process NCCL group with CUDA
    synchronisation debugging on, the host synchronisations counted by where Python called them;
(c) ``torch.compile`` of flexible training over two patch sizes: graphs (one per size), recompiles, graph breaks;
(d) a two-process DDP run of ``tools.train`` over gloo, both processes on the one GPU (``torchrun``);
(e) inference throughput against timm's VisionTransformer of the same shape at three patch sizes, in bf16.

Without a GPU the CUDA-only parts are skipped by name ("skipped: needs CUDA") and the rest runs on a tiny model, so
CI runs the command too (tests/test_gpu_check.py). Timings come from tools/benchmarks (median of calls in turn).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import flexivit
from flexivit.files import atomic_write_text
from tasks.common.precision import autocast, autocast_dtype, bf16_supported
from tools import train
from tools.benchmarks import common, compiled, speed
from tools.lib.profiling import device_description
from tools.lib.reporting import markdown_table

REPO = common.REPO
SKIP_CUDA = "skipped: needs CUDA"
ENGINE_CONFIG = "configs/classification/fashion_mnist.py:runlocal"
# The shapes of a GPU run and of a tiny run (no GPU, or --tiny): model, overrides, image size, batch sizes.
FULL = dict(model="flexivit_base", overrides={}, image_size=240, batch_size=32, gpu_batch_size=64,
            throughput_sizes=[32, 16, 8], compile_sizes=[16, 8], repeats=5)  # fmt: skip
TINY = dict(model="flexivit_mu", overrides=common.QUICK["overrides"], image_size=48, batch_size=2, gpu_batch_size=2,
            throughput_sizes=[16, 12, 8], compile_sizes=[16, 8], repeats=2)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu_check/report.md", help="the markdown report")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and image (automatic without CUDA)")
    p.add_argument("--model", help=f"registry name (default {FULL['model']}; tiny: {TINY['model']})")
    p.add_argument("--batch-size", type=int, help="images per training step in (a) and (c)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--compile-backend", help="default: inductor on CUDA, eager on CPU (counts graphs in seconds)")
    p.add_argument("--engine-steps", type=int, default=6, help="training steps of (b) and (d)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available here")
    args.tiny = args.tiny or args.device.type == "cpu"
    shape = TINY if args.tiny else FULL
    for key, value in shape.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.compile_backend = args.compile_backend or ("inductor" if args.device.type == "cuda" else "eager")
    return args


def bench_args(args, **extra) -> SimpleNamespace:
    """The options tools/benchmarks reads (bf16 on a GPU, fp32 on CPU: common.DEFAULT_PRECISION)."""
    return SimpleNamespace(overrides=args.overrides, image_size=args.image_size, batch_size=args.batch_size,
                           gpu_batch_size=args.gpu_batch_size, repeats=args.repeats, warmup=1, precision=None,
                           quick=args.tiny, **extra)  # fmt: skip


# ---------------------------------------------------------------------------------------------- (a) one step per size


def flash_only(on: bool):
    """Flash attention and nothing else (an unavailable kernel raises instead of falling back), where ``on``."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def part_steps(args) -> str:
    device, sizes = args.device, [p for p in flexivit.PAPER_PATCH_SIZES if p <= args.image_size]
    model = common.build_ours(args.model, args.overrides, device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch_size, model.kwargs["in_chans"], args.image_size, args.image_size, device=device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    flash = {"on": device.type == "cuda"}
    flash["note"] = "required in every step (sdpa_kernel([FLASH_ATTENTION]))" if flash["on"] else SKIP_CUDA
    rows, notes = [], []
    for precision in ("bf16", "fp16"):
        if precision == "fp16" and device.type != "cuda":
            notes.append(f"- fp16 with GradScaler: {SKIP_CUDA}")
            continue
        dtype = autocast_dtype(precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        for patch in sizes:
            out = {}

            def step(patch=patch, out=out, dtype=dtype, scaler=scaler) -> None:
                start = time.perf_counter()
                with flash_only(flash["on"]), autocast(device, dtype):
                    loss = F.cross_entropy(model(x, patch_size=patch).float(), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                out["loss"] = loss.item()  # the one synchronisation of the step: the time includes the kernels
                out["ms"] = 1e3 * (time.perf_counter() - start)

            row = {"precision": precision, "patch_size": patch, "tokens": (args.image_size // patch) ** 2}
            try:
                mib = common.peak_memory_mib(step, device)
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "result": "OUT OF MEMORY (lower --batch-size)"})
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            except RuntimeError as error:  # no flash kernel for this GPU, dtype or head size: say so, run without
                if not flash["on"]:
                    raise
                flash.update(on=False, note=f"UNAVAILABLE ({str(error).splitlines()[0]}); ran the default kernels")
                mib = common.peak_memory_mib(step, device)
            finite = math.isfinite(out["loss"])
            rows.append({**row, "step ms": out["ms"], "peak MiB": mib, "loss": out["loss"],
                         "result": "ok" if finite else "NON-FINITE LOSS"})  # fmt: skip
    text = (f"{args.model} at {args.image_size} px, batch {args.batch_size}; one step per patch size in this order, "
            f"first-call times (one-time kernel selection included)\n\n{markdown_table(rows)}\n"
            + "\n".join([*notes, f"- flash attention: {flash['note']}"]))  # fmt: skip
    if any(r["result"] != "ok" for r in rows):
        raise RuntimeError(text)
    return text


# ---------------------------------------------------------------------------------------------- (b) the engine, NCCL


def engine_argv(workdir: str, steps: int, *extra: str) -> list[str]:
    log = max(1, steps // 2)  # some steps log (.item() is expected there), the others must not synchronise
    sets = [f"train.steps={steps}", f"train.log_every={log}", f"train.ckpt_every={steps}", *extra]
    return ["--config", ENGINE_CONFIG, "--workdir", workdir, "--set", *sets]


def part_engine_nccl(args) -> str:
    if args.device.type != "cuda":
        return SKIP_CUDA
    saved = dict(os.environ)
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        dist.init_process_group("nccl")
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train.main(engine_argv(f"{tmp}/run", args.engine_steps, "train.precision=bf16"))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    short = lambda f: str(Path(f).relative_to(REPO)) if Path(f).is_relative_to(REPO) else Path(f).name  # noqa: E731
    where = collections.Counter(f"{short(w.filename)}:{w.lineno}" for w in syncs)
    rows = [{"where (Python caller)": k, "synchronisations": n} for k, n in where.most_common(15)]
    return (f"{ENGINE_CONFIG}, {args.engine_steps} steps in bf16, logging every {max(1, args.engine_steps // 2)}, "
            f"evaluation and checkpoint included; torch.cuda.set_sync_debug_mode('warn'): **{len(syncs)} host "
            f"synchronisations**\n\n" + (markdown_table(rows) if rows else ""))  # fmt: skip


# ---------------------------------------------------------------------------------------------- (c) compile


def part_compile(args) -> str:
    bench = bench_args(args, compile_patch_sizes=args.compile_sizes, compile_backend=args.compile_backend)
    rows, summary = compiled.bench_compile(args.model, bench, args.device)
    ok = summary["graphs_first_pass"] == summary["sizes"] and summary["graphs_later"] == 0
    text = (f"backend {args.compile_backend}, patch sizes {args.compile_sizes}, {summary['steps_later']} steps after "
            f"the first pass alternating the sizes\n\n- graphs: {summary['graphs_first_pass']} (one per patch size: "
            f"{summary['sizes']})\n- recompiles after the first pass: {summary['graphs_later']}\n- graph breaks: "
            f"{summary['graph_breaks']}\n\n{markdown_table(rows)}")  # fmt: skip
    if not ok:
        raise RuntimeError(text)
    return text


# ---------------------------------------------------------------------------------------------- (d) DDP over gloo


def part_ddp(args) -> str:
    """``torchrun`` of two ``tools.train`` processes over gloo (FLEXIVIT_DIST_BACKEND: NCCL refuses two ranks on one
    GPU), with one GPU visible so that both take it (tasks.common.distributed.choose_device: LOCAL_RANK modulo 1)."""
    one_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if args.device.type == "cuda" else ""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "tools.train", *engine_argv(f"{tmp}/run", args.engine_steps)]  # fmt: skip
        pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": pythonpath, "FLEXIVIT_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": one_gpu}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        log = Path(f"{tmp}/run/log.jsonl")
        identical = log.exists() and '"replicas_identical": true' in log.read_text()
    where = f"both processes on GPU {one_gpu}" if args.device.type == "cuda" else "both processes on the CPU"
    if done.returncode or not identical:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        what = "" if identical else " and logged no identical replicas"
        raise RuntimeError(f"torchrun exited with {done.returncode}{what} ({seconds:.0f} s):\n\n```\n{tail}\n```")
    return (f"torchrun, 2 processes over gloo, {where}: {ENGINE_CONFIG}, {args.engine_steps} steps, finished in "
            f"{seconds:.1f} s, replicas identical (the engine compares parameter checksums across ranks)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- (e) against timm


def part_throughput(args) -> str:
    bench = bench_args(args, patch_sizes=args.throughput_sizes)
    peak = common.matmul_peak_gflops(args.device, quick=args.tiny)
    ours = common.build_ours(args.model, args.overrides, args.device)
    rows = speed.bench_inference(ours, args.model, bench, args.device, peak)
    precision = common.device_precision(bench, args.device)
    columns = ["patch_size", "grid", "ours img/s", "timm img/s", "fixed img/s", "ours/timm", "fixed/timm",
               "ours of peak", "ours MiB", "timm MiB"]  # fmt: skip
    return (f"inference, {args.model} at {args.image_size} px, batch {common.batch_size(bench, args.device)}, "
            f"{precision}; median of {args.repeats} calls in turn; ours = flexible, fixed = flexivit.fix_patch_size "
            f"(what a deployment runs); matmul peak {peak:.0f} GFLOP/s\n\n"
            + markdown_table(rows, columns, percent=["ours of peak"]))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the report

PARTS = {
    "a": ("One training step per patch size: bf16, fp16 with GradScaler, flash attention", part_steps),
    "b": ("The engine in a one-process NCCL group, CUDA sync debugging on", part_engine_nccl),
    "c": ("torch.compile over two patch sizes", part_compile),
    "d": ("Two-process DDP on one GPU over gloo", part_ddp),
    "e": ("Throughput against timm's VisionTransformer", part_throughput),
}


def main(argv: list[str] | None = None) -> dict:
    """Run every part, write the report; returns ``{"status": {part: ok|skipped|failed}, "report": text}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.manual_seed(0)
    started, status, sections = time.perf_counter(), {}, []
    for key, (title, part) in PARTS.items():
        print(f"[gpu_check] ({key}) {title} ...", flush=True)
        try:
            text = part(args)
            status[key] = "skipped" if text.startswith("skipped") else "ok"
        except Exception as error:  # reported, and the other parts still run
            status[key] = "failed"
            text = f"**FAILED**: {type(error).__name__}: {error}"
            traceback.print_exc()
        sections += [f"## ({key}) {title}", "", text.rstrip(), ""]
    failed = [k for k, s in status.items() if s == "failed"]
    verdict = f"failed: {', '.join(failed)}" if failed else "every part that ran passed"
    summary = ", ".join(f"({k}) {s}" for k, s in status.items())
    cuda = f", CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}" if args.device.type == "cuda" else ""
    report = "\n".join([
        "# GPU check",
        "",
        f"- command: `{common.command('tools.gpu_check', argv)}`",
        f"- device: {device_description(args.device)}; torch {torch.__version__}{cuda}",
        f"- bf16 in hardware: {'yes' if bf16_supported(args.device) else 'no (emulated: slower than fp32)'}",
        f"- model: {args.model} {args.overrides or ''} at {args.image_size} px" + (" (tiny)" if args.tiny else ""),
        f"- took {time.perf_counter() - started:.0f} s; {verdict} ({summary})",
        "",
        *sections,
    ])  # fmt: skip
    atomic_write_text(Path(args.out), report)
    print(f"[gpu_check] {verdict}; wrote {args.out}", flush=True)
    return {"status": status, "report": report, "failed": failed}


if __name__ == "__main__":
    raise SystemExit(1 if main().get("failed") else 0)
