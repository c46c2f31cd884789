"""tools/benchmarks runs end to end on a tiny model and writes its reports (the timings are not asserted)."""

import csv

import pytest
import torch

from tools.benchmarks import __main__ as benchmarks
from tools.benchmarks import common, compiled, precision, report, sampler, speed


def test_quick_benchmark_writes_table_csv_and_plot(tmp_path):
    path = benchmarks.main(["--quick", "--out", str(tmp_path)])
    text = path.read_text()
    assert path == tmp_path / "benchmarks.md"
    for heading in ("## Targets", "## Inference: mu on cpu", "## Training step: mu on cpu", "## How to read this",
                    "## The benchmark commands", "## Input pipeline vs model"):  # fmt: skip
        assert heading in text
    assert "| patch_size | grid | gflops | ours ms | fixed ms | timm ms |" in text
    assert "`python -m tools.benchmarks --quick --out " in text  # the exact command is recorded
    with open(tmp_path / "benchmarks.csv") as f:
        rows = list(csv.DictReader(f))
    inference = [r for r in rows if r["section"] == "inference"]
    assert [int(r["patch_size"]) for r in inference] == common.QUICK["patch_sizes"]
    assert all(float(r["ours/timm"]) > 0 and float(r["gflops"]) > 0 for r in inference)
    # Same shape, same counted work: the timm baseline is the right comparison.
    assert all(float(r["gflops"]) == pytest.approx(float(r["timm gflops"]), rel=1e-6) for r in inference)
    assert [int(r["patch_size"]) for r in rows if r["section"] == "train"] == common.QUICK["patch_sizes"]
    assert (tmp_path / "benchmarks.png").stat().st_size > 0 and (tmp_path / "benchmarks_ratio.png").stat().st_size > 0


def test_speed_command_prints_its_rows_for_each_patch_size(capsys):
    results = speed.main(["--quick", "--patch-sizes", "16", "--skip-train", "--devices", "cpu"])
    (row,) = results["inference"]
    assert (row["model"], row["device"], row["patch_size"], row["grid"]) == ("mu", "cpu", 16, 3)
    assert results["training"] == []
    # Ours and timm's model of the same shape count the same work (3x3 tokens at 48 px / 16).
    assert row["gflops"] == pytest.approx(row["timm gflops"], rel=1e-6)
    assert "| mu | cpu | 16 | 3 |" in capsys.readouterr().out


def test_targets_are_met_or_not_by_the_measured_ratios():
    inference = [
        {"model": "S", "device": "cpu", "patch_size": p, "grid": 240 // p, "ours/timm": r, "resize share": s,
         "ours of peak": 0.9, "timm of peak": 0.8}
        for p, r, s in ((16, 1.02, 0.004), (8, 0.97, 0.002))
    ]  # fmt: skip
    training = [{"model": "S", "device": "cpu", "patch_size": 16, "flex/fixed cost": 1.01}]
    out = {t["target"].split(" (")[0]: t["met"] for t in report.targets(inference, training, None, batch=8)}
    assert out["CPU forward throughput >= 1.00x timm at every patch size"] == "no"  # 0.97 at patch 8
    assert out["flexible training step at p <= 1.03x a fixed-p step"] == "yes"
    assert out["kernel + posemb resize < 1% of a forward at grid >= 8"] == "yes"
    assert out["CPU forward >= 85% of the fp32 matmul peak at grid >= 15"] == "yes"


def test_peak_memory_sees_a_large_allocation():
    if common.peak_memory_mib(lambda: None, torch.device("cpu")) is None:
        pytest.skip("no /proc/self/clear_refs here")
    mib = common.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert 60 < mib < 200


def test_alternate_ms_takes_turns_and_runs_before_each_timed_call():
    calls = []
    ms = common.alternate_ms(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), warmup=1, repeats=2,
        before={"a": lambda: calls.append("switch"), "b": lambda: None},
    )  # fmt: skip
    assert calls == ["a", "b", "switch", "a", "b", "b", "switch", "a"]  # warm-up, then each goes first in turn
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_compiled_flexible_training_builds_one_graph_per_patch_size():
    # The eager backend: dynamo captures and counts graphs exactly as with inductor, without code generation.
    parser = common.parser(compiled.__doc__)
    compiled.add_arguments(parser)
    args = common.parse(parser, ["--quick", "--compile-backend", "eager"])
    _, summary = compiled.bench_compile("flexivit_mu", args, torch.device("cpu"))
    assert summary["graphs_first_pass"] == summary["sizes"] == len(common.QUICK["compile_patch_sizes"])
    assert summary["graphs_later"] == 0 and summary["graph_breaks"] == 0


def test_sampler_report_names_its_rows(tmp_path):
    path = sampler.main(["--quick", "--out", str(tmp_path)])
    text = path.read_text()
    assert path == tmp_path / "benchmarks_index.md" and "`python -m tools.benchmarks.sampler --quick --out " in text
    rows = sampler.bench_index(num_items=200_000, batch=64, steps=20)  # timings are reported, not asserted
    assert [r["what"].split(" (")[0] for r in rows] == ["per step, drawn once per epoch", "first step of an epoch"]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["MiB held"] == pytest.approx(200_000 * 16 / 2**20)


def test_precision_compares_bf16_and_onnxruntime(tmp_path):
    path = precision.main(["--quick", "--onnx-patch-sizes", "8", "--out", str(tmp_path)])
    assert path == tmp_path / "benchmarks_deployment.md"
    with open(tmp_path / "benchmarks_deployment.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows_bf16 = [row for row in rows if row["bf16 ms"]]
    assert [int(row["patch_size"]) for row in rows_bf16] == [16, 12, 8]
    # bf16 autocast changed the numbers (it ran), but only by rounding.
    assert all(1e-4 < float(row["bf16 rel. error"]) < 0.05 for row in rows_bf16)
    (onnx,) = [row for row in rows if row["onnxruntime ms"]]
    assert int(onnx["patch_size"]) == 8 and 0 < float(onnx["max abs diff"]) < 1e-4  # 0 would mean zero logits
    assert "`python -m tools.benchmarks.precision --quick --onnx-patch-sizes 8" in path.read_text()
