"""tools/benchmark.py runs end to end on a tiny model and writes its report (the numbers are not asserted)."""

import csv

import pytest
import torch

from tools import benchmark


def test_quick_benchmark_writes_table_csv_and_plot(tmp_path):
    path = benchmark.main(["--quick", "--out", str(tmp_path)])
    text = path.read_text()
    assert path == tmp_path / "benchmarks.md"
    for heading in ("## Targets", "## Inference: mu on cpu", "## Training step: mu on cpu", "## How to read this"):
        assert heading in text
    assert "| patch_size | grid | gflops | ours ms | fixed ms | timm ms |" in text
    assert "`python -m tools.benchmark --quick --out " in text  # the exact command is recorded
    with open(tmp_path / "benchmarks.csv") as f:
        rows = list(csv.DictReader(f))
    inference = [r for r in rows if r["section"] == "inference"]
    assert [int(r["patch_size"]) for r in inference] == benchmark.QUICK["patch_sizes"]
    assert all(float(r["ours/timm"]) > 0 and float(r["gflops"]) > 0 for r in inference)
    # Same shape, same counted work: the timm baseline is the right comparison.
    assert all(float(r["gflops"]) == pytest.approx(float(r["timm gflops"]), rel=1e-6) for r in inference)
    assert (tmp_path / "benchmarks.png").stat().st_size > 0 and (tmp_path / "benchmarks_ratio.png").stat().st_size > 0


def test_peak_memory_sees_a_large_allocation():
    if benchmark.peak_memory_mib(lambda: None, torch.device("cpu")) is None:
        pytest.skip("no /proc/self/clear_refs here")
    mib = benchmark.peak_memory_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert 60 < mib < 200


def test_compiled_flexible_training_builds_one_graph_per_patch_size(tmp_path):
    # The eager backend: dynamo captures and counts graphs exactly as with inductor, without code generation.
    args = benchmark.parse_args(["--quick", "--compile", "--compile-backend", "eager", "--out", str(tmp_path)])
    _, summary = benchmark.bench_compile("flexivit_mu", args, torch.device("cpu"), batch=2)
    assert summary["graphs_first_pass"] == summary["sizes"] == len(benchmark.QUICK["compile_patch_sizes"])
    assert summary["graphs_later"] == 0 and summary["graph_breaks"] == 0


def test_index_cost_report_names_the_sampler_rows(tmp_path):
    path = benchmark.main(["--index-cost", "--quick", "--out", str(tmp_path)])
    text = path.read_text()
    assert path == tmp_path / "benchmarks_index.md" and "--index-cost --quick" in text
    rows = benchmark.bench_index(num_items=200_000, batch=64, steps=20)  # timings are reported, not asserted
    assert [r["what"].split(" (")[0] for r in rows] == ["per step, drawn once per epoch", "first step of an epoch",
                                                       "per step, drawn every step"]  # fmt: skip
    assert all(r["ms"] > 0 for r in rows) and rows[0]["MiB held"] == pytest.approx(200_000 * 16 / 2**20)


def test_deployment_section_compares_precisions_and_onnxruntime(tmp_path):
    path = benchmark.main(["--deployment", "--quick", "--onnx-patch-sizes", "8", "--out", str(tmp_path)])
    assert path == tmp_path / "benchmarks_deployment.md"
    with open(tmp_path / "benchmarks_deployment.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    precision = [row for row in rows if row["bf16 ms"]]
    assert [int(row["patch_size"]) for row in precision] == [16, 12, 8]
    # bf16 autocast changed the numbers (it ran), but only by rounding.
    assert all(1e-4 < float(row["bf16 rel. error"]) < 0.05 for row in precision)
    (onnx,) = [row for row in rows if row["onnxruntime ms"]]
    assert int(onnx["patch_size"]) == 8 and 0 < float(onnx["max abs diff"]) < 1e-4  # 0 would mean zero logits
    assert "--deployment --quick" in path.read_text()
