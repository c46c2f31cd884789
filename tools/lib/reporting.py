"""Writing sweep results: CSV, Markdown tables and accuracy-vs-cost plots (paper Fig. 2 / Fig. 8).

A sweep result is a list of row dicts, one per (model, patch size), e.g.
``{"model": "flexivit", "patch_size": 8, "grid": "30x30", "tokens": 900, "gflops": 4.6, "img_per_s": 123.4,
"latency_ms": 65.0, "accuracy": 0.873}``. Keys may differ between tasks and rows; a missing value is written
as an empty cell and skipped in plots.

Every writer creates the parent folders and writes atomically (:func:`flexivit.files.atomic_write`), so a crash
or an interrupted job never leaves a half-written results file behind.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from flexivit.files import atomic_write

Row = Mapping[str, Any]

# Axis labels for the usual keys; any other key is used as its own label.
AXIS_LABELS = {
    "gflops": "GFLOPs per image",
    "img_per_s": "Throughput (images / s)",
    "latency_ms": "Latency per batch (ms)",
    "tokens": "Tokens",
}


def _atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """``write(f)`` into an open temporary file, renamed onto ``path`` by :func:`flexivit.files.atomic_write`."""

    def to_file(tmp: str) -> None:
        with open(tmp, mode, **({"newline": "", "encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)

    atomic_write(path, to_file)
    return Path(path)


def columns_of(rows: Sequence[Row]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Write ``rows`` as CSV with the union of their keys as columns; missing values are empty cells."""

    def write(f: IO) -> None:
        writer = csv.DictWriter(f, fieldnames=columns_of(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)

    return _atomic_write(path, write)


def _format_float(value: float) -> str:
    # Three to four significant digits; fixed-point for the magnitudes a sweep produces (GFLOPs, img/s, accuracy).
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    if magnitude >= 1:
        return f"{value:.3f}"
    if magnitude == 0:
        return "0"
    return f"{value:#.3g}"  # "#" keeps trailing zeros: 0.410, not 0.41


def _format_cell(value: Any, column: str, floatfmt: str | Mapping[str, str] | None, percent: Sequence[str]) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, tuple | list):  # (8, 16) -> 8x16, the notation of patch sizes and grids
            return "x".join(map(str, value))
        return str(value).replace("|", "\\|")
    if column in percent:
        return f"{100 * value:.2f}"
    if isinstance(value, int):
        return str(value)
    fmt = floatfmt.get(column) if isinstance(floatfmt, Mapping) else floatfmt
    return format(value, fmt) if fmt else _format_float(value)


def markdown_table(
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    floatfmt: str | Mapping[str, str] | None = None,
    percent: Sequence[str] = (),
) -> str:
    """A GitHub Markdown table of ``rows``.

    Args:
        columns: the columns to show, in order (default: all, in first-seen order).
        floatfmt: a format spec for floats, e.g. ``".2f"``, or a dict of them per column; by default about four
            significant digits.
        percent: columns of fractions to show as percentages (``0.873 -> 87.30``, header ``accuracy (%)``).
    """
    columns = list(columns) if columns is not None else columns_of(rows)
    cells = [[_format_cell(row.get(c), c, floatfmt, percent) for c in columns] for row in rows]
    header = [f"{c} (%)" if c in percent else c for c in columns]
    # Right-align columns that hold only numbers, so that digits line up when the Markdown is rendered.
    numeric = [
        all(isinstance(row.get(c), int | float) and not isinstance(row.get(c), bool) for row in rows if c in row)
        for c in columns
    ]
    separator = ["---:" if is_num else "---" for is_num in numeric]
    lines = [header, separator, *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def write_markdown(
    rows: Sequence[Row],
    path: str | Path,
    title: str | None = None,
    notes: str | Sequence[str] | None = None,
    *,
    columns: Sequence[str] | None = None,
    floatfmt: str | Mapping[str, str] | None = None,
    percent: Sequence[str] = (),
) -> Path:
    """Write a Markdown file: ``# title``, ``notes`` (a paragraph, or one bullet per item of a list), the table."""
    out = io.StringIO()
    if title:
        out.write(f"# {title}\n\n")
    if notes:
        out.write(notes if isinstance(notes, str) else "\n".join(f"- {note}" for note in notes))
        out.write("\n\n")
    out.write(markdown_table(rows, columns, floatfmt, percent))
    return _atomic_write(path, lambda f: f.write(out.getvalue()))


def _number(value: Any) -> float | None:
    """``value`` as a finite float (also from CSV strings), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _patch_area(value: Any) -> float | None:
    if isinstance(value, tuple | list) and len(value) == 2:
        h, w = _number(value[0]), _number(value[1])
        return None if h is None or w is None else h * w
    side = _number(value)
    return None if side is None else side * side


def _patch_label(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "x".join(map(str, value)) if len(set(value)) > 1 else str(value[0])
    return "" if value is None else str(value)


def plot_sweep(
    rows: Sequence[Row],
    path: str | Path,
    *,
    metric: str = "accuracy",
    metric_label: str | None = None,
    x_keys: Sequence[str] = ("gflops", "img_per_s"),
    group_key: str = "model",
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against each of ``x_keys`` (one subplot each, log x axis), one line per ``group_key``.

    Each point is labelled with its ``patch_size``. Rows that lack the metric or an x value (or have a
    non-positive x, which a log axis cannot show) are left out of that subplot.
    """
    # The object-oriented API without pyplot: no global figure state and no GUI backend, so this works headless
    # (it renders with Agg, as matplotlib.use("Agg") would) without switching the backend of a calling notebook.
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(str(row.get(group_key, "")) for row in rows))
    fig = Figure(figsize=(5.5 * len(x_keys), 4.5), layout="constrained")
    axes = fig.subplots(1, len(x_keys), squeeze=False)[0]
    for ax, x_key in zip(axes, x_keys, strict=True):
        for index, group in enumerate(groups):
            members = [row for row in rows if str(row.get(group_key, "")) == group]
            # Connect the points in patch-size order (largest patch first), as in the paper's figures, so that
            # noisy throughput shows as a kink in the line rather than as a reordering of the patch sizes.
            areas = [_patch_area(row.get("patch_size")) for row in members]
            if None not in areas:
                members = [row for _, row in sorted(zip(areas, members, strict=True), key=lambda p: -p[0])]
            points = [
                (x, y, _patch_label(row.get("patch_size")))
                for row in members
                if (x := _number(row.get(x_key))) is not None and (y := _number(row.get(metric))) is not None and x > 0
            ]
            if not points:
                continue
            # A fixed colour per group, so that a model keeps its colour in a subplot where another has no points.
            color = f"C{index % 10}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=group or None)
            for x, y, label in points:
                ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7, color=color)
        if ax.lines:
            ax.set_xscale("log")
            if any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
                ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no rows with {x_key} and {metric}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(AXIS_LABELS.get(x_key, x_key))
        ax.set_ylabel(metric_label or metric)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    suffix = Path(path).suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda f: fig.savefig(f, format=suffix, dpi=120), mode="wb")
