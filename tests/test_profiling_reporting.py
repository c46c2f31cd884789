"""Tests of tools.lib.profiling (GFLOPs, throughput) and tools.lib.reporting (CSV, Markdown, plots)."""

from __future__ import annotations

import csv
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flexivit
from tools.lib import profiling, reporting

# ------------------------------------------------------------------------------------------------ profiling


def test_gflops_of_linear_is_exact():
    assert profiling.count_gflops_fn(nn.Linear(64, 32), torch.randn(1, 64)) == 2 * 64 * 32 / 1e9
    # Per image: a bigger example batch gives the same number.
    assert profiling.count_gflops_fn(nn.Linear(64, 32), torch.randn(5, 64)) == 2 * 64 * 32 / 1e9


def test_gflops_counts_sdpa_on_cpu():
    # FlopCounterMode alone counts 0 for the CPU attention kernel; profiling registers a formula for it.
    q = torch.randn(1, 2, 37, 64)
    gflops = profiling.count_gflops_fn(lambda x: F.scaled_dot_product_attention(x, x, x), q)
    assert gflops == 2 * (2 * 2 * 37 * 37 * 64) / 1e9  # scores q @ k^T and the weighted sum of v


def _analytic_flops(tokens: int, patch: tuple[int, int], width: int = 128, depth: int = 2, chans: int = 3) -> int:
    """Matmul and conv FLOPs (multiply-add = 2) of a ViT without head, per image.

    Included: per block qkv 2*T*D*3D, attention scores and weighted sum 2*T*T*D*2, output projection 2*T*D*D,
    MLP 2*2*T*D*4D, with T = N + 1 (class token); plus the patch embedding conv 2*N*(C*ph*pw)*D.
    Not included (FlopCounterMode does not count them): biases, LayerNorm, GELU, softmax, residual and
    position-embedding adds. The batch-independent kernel / position-embedding resize is excluded by design.
    """
    t, d = tokens + 1, width
    block = 2 * t * d * 3 * d + 2 * t * t * d * 2 + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    return depth * block + 2 * tokens * (chans * patch[0] * patch[1]) * d


def test_flexivit_gflops_match_analytic_count():
    model = flexivit.create_model("flexivit_mu", depth=2)
    model.train()
    g8 = profiling.count_gflops(model, 48, 8)  # 6x6 = 36 tokens
    g16 = profiling.count_gflops(model, 48, 16)  # 3x3 = 9 tokens
    g8x16 = profiling.count_gflops(model, (48, 48), (8, 16))  # 6x3 = 18 tokens
    assert model.training, "count_gflops must restore the training mode"
    assert g8 > 3 * g16
    # The counter sees exactly the ops of the analytic count, so the match is exact, not just within a few %.
    assert g8 == pytest.approx(_analytic_flops(36, (8, 8)) / 1e9, rel=1e-9)
    assert g16 == pytest.approx(_analytic_flops(9, (16, 16)) / 1e9, rel=1e-9)
    assert g8x16 == pytest.approx(_analytic_flops(18, (8, 16)) / 1e9, rel=1e-9)


def test_split_gflops_separates_the_per_call_resize():
    model = flexivit.create_model("flexivit_mu", depth=2).eval()
    per_image, per_call = profiling.split_gflops(lambda x: model(x, patch_size=8), torch.zeros(1, 3, 48, 48))
    assert per_image == pytest.approx(_analytic_flops(36, (8, 8)) / 1e9, rel=1e-9)
    # The per-call rest is exactly the two separable resizes, each two matmuls per slice: the 32x32 kernel to 8x8
    # per (D, C) slice (8x32 @ 32x32, then 8x32 @ 32x8) and the 7x7 position embedding to the 6x6 grid per channel
    # (6x7 @ 7x7, then 6x7 @ 7x6). Charging any of it to the image, or counting it twice, changes the numbers.
    kernel_resize = 128 * 3 * (2 * 8 * 32 * 32 + 2 * 8 * 32 * 8)
    posemb_resize = 128 * (2 * 6 * 7 * 7 + 2 * 6 * 7 * 6)
    assert per_call == pytest.approx((kernel_resize + posemb_resize) / 1e9, rel=1e-9)


class FakeClock:
    """A perf_counter that only moves when the timed function says so: timing tests without wall-clock flakiness."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_throughput_of_a_known_duration(monkeypatch):
    clock, batch = FakeClock(), 4
    monkeypatch.setattr(profiling.time, "perf_counter", clock)

    def fn(x):
        clock.t += 0.02

    result = profiling.measure_throughput(fn, torch.zeros(batch, 3), warmup=1, repeats=3)
    assert result["batch_size"] == batch
    assert result["latency_ms"] == pytest.approx(20.0)
    assert result["img_per_s"] == pytest.approx(batch / 0.02)


def test_throughput_uses_median_and_min_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(profiling.time, "perf_counter", clock)
    durations = iter([0.0, 0.2] + [0.005] * 100)  # one warm-up, then one slow outlier among fast calls
    calls = []

    def fn(x):
        calls.append(1)
        clock.t += next(durations)

    result = profiling.measure_throughput(fn, torch.zeros(2, 3), warmup=1, repeats=3, min_time_s=0.3)
    assert result["latency_ms"] == pytest.approx(5.0)  # the median; a mean would be > 5 ms
    # min_time_s keeps timing past `repeats` until the timed calls add up: 0.2 s + 20 calls of 5 ms = 0.3 s.
    assert len(calls) - 1 == 1 + 20


def test_device_description():
    text = profiling.device_description("cpu")
    assert text.startswith("CPU: ") and f"{torch.get_num_threads()} threads" in text


# ------------------------------------------------------------------------------------------------ reporting

ROWS = [
    {"model": "flexivit", "patch_size": 8, "grid": "6x6", "tokens": 36, "gflops": 0.0323, "img_per_s": 812.5,
     "latency_ms": 9.846, "accuracy": 0.8734},
    {"model": "flexivit", "patch_size": 16, "grid": "3x3", "tokens": 9, "gflops": 0.00974, "img_per_s": 2450.0,
     "latency_ms": 3.265, "accuracy": 0.8012},
    {"model": "vit_b16", "patch_size": 16, "grid": "3x3", "tokens": 9, "gflops": 0.00974, "img_per_s": 2401.3,
     "latency_ms": 3.331, "accuracy": 0.7901, "miou": 0.41},
]  # fmt: skip


def test_csv_round_trip(tmp_path):
    path = reporting.write_csv(ROWS, tmp_path / "deep" / "dir" / "sweep.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == [*ROWS[0], "miou"]  # union of keys, first-seen order
    assert len(read) == 3
    assert read[0]["model"] == "flexivit" and int(read[0]["tokens"]) == 36
    assert float(read[0]["accuracy"]) == 0.8734 and float(read[2]["img_per_s"]) == 2401.3
    assert read[0]["miou"] == "" and float(read[2]["miou"]) == 0.41
    assert sorted(p.name for p in path.parent.iterdir()) == ["sweep.csv"], "no temporary file left behind"


def test_markdown_table():
    table = reporting.markdown_table(ROWS, percent=["accuracy"])
    lines = table.strip().split("\n")
    assert len(lines) == 2 + len(ROWS)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "patch_size", "grid", "tokens", "gflops", "img_per_s", "latency_ms", "accuracy (%)",
                      "miou"]  # fmt: skip
    assert re.fullmatch(r"\|( *:?-{3,}:? *\|)+", lines[1])
    first = [c.strip() for c in lines[1 + 1].strip("|").split("|")]
    assert first == ["flexivit", "8", "6x6", "36", "0.0323", "812.5", "9.846", "87.34", ""]
    last = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert last[0] == "vit_b16" and last[-2:] == ["79.01", "0.410"]


def test_markdown_table_columns_and_floatfmt():
    table = reporting.markdown_table(ROWS, columns=["model", "gflops"], floatfmt=".4f")
    assert table.splitlines()[2] == "| flexivit | 0.0323 |"


def test_write_markdown(tmp_path):
    path = reporting.write_markdown(ROWS, tmp_path / "out" / "sweep.md", title="Sweep", notes=["CPU: test", "x"])
    text = path.read_text()
    assert text.startswith("# Sweep\n\n- CPU: test\n- x\n\n| model |")
    assert text.count("\n| ") == 2 + len(ROWS)


@pytest.mark.parametrize("drop_throughput", [False, True])
def test_plot_sweep_writes_png(tmp_path, drop_throughput):
    rows = [dict(r) for r in ROWS]
    if drop_throughput:
        for row in rows[1:]:
            del row["img_per_s"]
    path = reporting.plot_sweep(rows, tmp_path / "plots" / "sweep.png", title="t", metric_label="Accuracy")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]


def test_plot_sweep_accepts_rows_read_from_csv(tmp_path):
    # Values read back from a CSV are strings, and missing ones are empty strings: plot the numbers, skip the rest.
    reporting.write_csv(ROWS, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    path = reporting.plot_sweep(rows, tmp_path / "sweep.png", metric="miou", x_keys=("gflops",))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
