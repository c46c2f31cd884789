"""tools.gpu_check on CPU (its CUDA-only parts skipped by name, the rest run tiny), and bf16 emulation detection."""

import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from markers import needs_fashion_mnist

import flexivit
from tasks.common import precision
from tools import gpu_check

SECTIONS = ["## (a) One training step", "## (b) The engine in a one-process NCCL group", "## (c) torch.compile",
            "## (d) Two-process DDP", "## (e) Throughput against timm"]  # fmt: skip


def section(report: str, key: str) -> str:
    return report.split(f"## ({key})")[1].split("\n## (")[0]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    return gpu_check.main(["--device", "cpu", "--out", str(out), "--engine-steps", "2"]), out


@needs_fashion_mnist  # part (d) trains on it
def test_cpu_run_reports_every_part_and_skips_the_cuda_ones_by_name(cpu_run):
    result, out = cpu_run
    report = out.read_text()
    assert report == result["report"]
    assert [s for s in SECTIONS if s not in report] == []
    assert result["status"] == {"a": "ok", "b": "skipped", "c": "ok", "d": "ok", "e": "ok"}, report
    assert section(report, "b").strip().endswith("skipped: needs CUDA")
    steps = section(report, "a")
    assert "fp16 with GradScaler: skipped: needs CUDA" in steps and "flash attention: skipped: needs CUDA" in steps
    # One bf16 step per paper patch size (all tile the tiny 48 px image), each with its time, memory and loss.
    rows = re.findall(r"^\| bf16 \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ok \|$", steps, re.M)
    assert [int(r[0]) for r in rows] == list(flexivit.PAPER_PATCH_SIZES)
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
    # Compile: one graph per patch size, none compiled again when the sizes alternate, no graph break.
    sizes = gpu_check.TINY["compile_sizes"]
    assert f"- graphs: {len(sizes)} (one per patch size: {len(sizes)})" in section(report, "c")
    assert "- recompiles after the first pass: 0" in report and "- graph breaks: 0" in report
    assert "replicas identical" in section(report, "d")
    throughput = re.findall(r"^\| (\d+) \| \d+ \| ([\d.]+) \| ([\d.]+) \|", section(report, "e"), re.M)
    assert [int(r[0]) for r in throughput] == gpu_check.TINY["throughput_sizes"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in throughput)


def _stub(text):
    def part(args):
        if isinstance(text, Exception):
            raise text
        return text

    return part


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    parts = {k: (title, _stub(f"ran {k}")) for k, (title, _) in gpu_check.PARTS.items()}
    parts["b"] = (parts["b"][0], _stub(gpu_check.SKIP_CUDA))
    parts["c"] = (parts["c"][0], _stub(RuntimeError("- recompiles after the first pass: 3")))
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    result = gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "r.md")])
    assert result["status"] == {"a": "ok", "b": "skipped", "c": "failed", "d": "ok", "e": "ok"}
    assert result["failed"] == ["c"]
    assert "**FAILED**: RuntimeError: - recompiles after the first pass: 3" in section(result["report"], "c")
    assert "ran e" in section(result["report"], "e") and "failed: c" in result["report"]


def test_recompiles_fail_the_compile_part(monkeypatch):
    summary = {"sizes": 2, "graphs_first_pass": 2, "graphs_later": 3, "graph_breaks": 0, "steps_later": 4}
    monkeypatch.setattr(gpu_check.compiled, "bench_compile", lambda name, args, device: ([], summary))
    args = gpu_check.parse_args(["--device", "cpu"])
    with pytest.raises(RuntimeError, match="recompiles after the first pass: 3"):
        gpu_check.part_compile(args)


def test_engine_part_counts_the_sync_warnings_in_a_one_process_group(monkeypatch):
    # The NCCL part's plumbing on CPU: gloo stands in for NCCL, a stub engine for tools.train, warnings for the syncs.
    real_init = gpu_check.dist.init_process_group
    monkeypatch.setattr(gpu_check.dist, "init_process_group", lambda backend: real_init("gloo"))
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    env_before = dict(os.environ)

    def engine(argv):
        assert gpu_check.dist.get_world_size() == 1 and os.environ["RANK"] == "0" and modes == ["warn"]
        assert "train.precision=bf16" in argv and f"train.steps={args.engine_steps}" in argv
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # one line: one row of 3
        warnings.warn("something else", stacklevel=1)

    monkeypatch.setattr(gpu_check.train, "main", engine)
    args = SimpleNamespace(device=torch.device("cuda"), engine_steps=4)
    text = gpu_check.part_engine_nccl(args)
    assert "**3 host synchronisations**" in text
    assert re.search(r"\| tests/test_gpu_check.py:\d+ \| 3 \|", text)
    assert modes == ["warn", "default"] and not gpu_check.dist.is_initialized() and dict(os.environ) == env_before


# ---------------------------------------------------------------------------------------------- bf16 emulation


def test_cpu_bf16_support_comes_from_the_cpuinfo_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f\n")
    assert precision._cpu_flags.__wrapped__(str(cpuinfo)) == {"fpu", "avx2", "avx512f"}
    assert precision._cpu_flags.__wrapped__(str(tmp_path / "missing")) is None
    cpu = torch.device("cpu")
    for flags, native in [({"avx2", "avx512f"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True),
                          ({"asimd", "bf16"}, True), (None, True)]:  # fmt: skip
        monkeypatch.setattr(precision, "_cpu_flags", lambda flags=flags: None if flags is None else frozenset(flags))
        assert precision.bf16_supported(cpu) is native, flags


def test_cuda_bf16_support_excludes_emulation(monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    asked = []

    def is_bf16_supported(including_emulation=True):  # a T4 / V100: bf16 only by emulation
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.bf16_supported(torch.device("cuda")) is False and asked == [False]
    # A torch without including_emulation: decided by the compute capability (bf16 units from 8.0, Ampere).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    for capability, native in [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert precision.bf16_supported(torch.device("cuda")) is native


def test_bf16_warns_once_where_it_is_emulated(monkeypatch):
    monkeypatch.setattr(precision, "_WARNED_BF16", set())
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="bf16 is emulated on this CPU .* slower than fp32"):
        assert precision.autocast_dtype("bf16", cpu) == torch.bfloat16  # still bf16: the user asked for it
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        precision.autocast_dtype("bf16", cpu)
        precision.autocast_dtype("fp32", cpu)
    assert again == []  # once per process
    monkeypatch.setattr(precision, "_WARNED_BF16", set())
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    with warnings.catch_warnings(record=True) as native:
        warnings.simplefilter("always")
        precision.autocast_dtype("bf16", cpu)
    assert native == []
