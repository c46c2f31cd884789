"""Choosing the patch size for a deployment budget (paper Sec. 1 and Fig. 2: train once, pick the size at deployment).

A FlexiViT gives one (metric, cost) point per patch size. The points worth deploying are the Pareto front: sizes
that no other size beats on both metric and cost. Given a budget, :func:`choose` takes the best metric within it;
given only a minimum metric, the cheapest size that reaches it. Rows are the plain dicts that ``tools.eval`` and
``tools.deploy`` write (``patch_size``, ``latency_ms``, ``gflops`` and the task's metrics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import flexivit


class BudgetError(ValueError):
    """No patch size meets the requested budget or metric; the message names the closest one."""


def backbone_of(model: torch.nn.Module) -> flexivit.FlexiViT:
    """The FlexiViT of a task model (the model itself for classification, else the first one inside it)."""
    if isinstance(model, flexivit.FlexiViT):
        return model
    found = next((m for m in model.modules() if isinstance(m, flexivit.FlexiViT)), None)
    if found is None:
        raise ValueError(f"{type(model).__name__} holds no FlexiViT")
    return found


def pareto_front(rows: Sequence[dict], metric: str, cost: str = "latency_ms") -> list[dict]:
    """The rows that no other row dominates (at most the cost and at least the metric, one strictly), cheapest first."""
    scored = [row for row in rows if _has(row, metric) and _has(row, cost)]
    front = []
    for row in sorted(scored, key=lambda r: (r[cost], -r[metric])):
        if not front or row[metric] > front[-1][metric]:
            front.append(row)
    return front


def choose(
    rows: Sequence[dict],
    metric: str,
    *,
    budget_ms: float | None = None,
    budget_gflops: float | None = None,
    min_metric: float | None = None,
) -> dict:
    """The row to deploy.

    With a budget (``latency_ms`` <= ``budget_ms`` and / or ``gflops`` <= ``budget_gflops``): the highest ``metric``
    among the rows within it that also reach ``min_metric`` when given (ties: the cheaper). With only
    ``min_metric``: the fastest row that reaches it (by latency, or GFLOPs when there is no latency). Raises
    :class:`BudgetError` naming the fastest (or best) size when nothing qualifies.
    """
    if budget_ms is None and budget_gflops is None and min_metric is None:
        raise ValueError("give a budget (budget_ms / budget_gflops) or a min_metric")
    rows = [row for row in rows if _has(row, metric)]
    if not rows:
        raise ValueError(f"no row has a value for the metric {metric!r}")
    cost = "latency_ms" if all(_has(row, "latency_ms") for row in rows) else "gflops"
    for name, limit in (("latency_ms", budget_ms), ("gflops", budget_gflops)):
        if limit is None:
            continue
        missing = [row["patch_size"] for row in rows if not _has(row, name)]
        if missing:
            raise ValueError(f"a budget on {name} needs it for every patch size; missing for {missing}")
        within = [row for row in rows if row[name] <= limit]
        if not within:
            cheapest = min(rows, key=lambda row: row[name])
            unit = "ms" if name == "latency_ms" else "GFLOPs"
            raise BudgetError(
                f"no patch size meets the budget of {limit:g} {unit}: the cheapest is patch {cheapest['patch_size']} "
                f"at {cheapest[name]:.4g} {unit} ({metric} {cheapest[metric]:.4g})"
            )
        rows = within
    if min_metric is not None:
        good = [row for row in rows if row[metric] >= min_metric]
        if not good:
            best = max(rows, key=lambda row: row[metric])
            where = "within the budget" if budget_ms is not None or budget_gflops is not None else "at any size"
            raise BudgetError(
                f"no patch size reaches {metric} >= {min_metric:g} {where}: the best is patch {best['patch_size']} "
                f"with {best[metric]:.4g} ({best[cost]:.4g} {'ms' if cost == 'latency_ms' else 'GFLOPs'})"
            )
        if budget_ms is None and budget_gflops is None:
            return min(good, key=lambda row: (row[cost], -row[metric]))
        rows = good
    return max(rows, key=lambda row: (row[metric], -row[cost]))


def _has(row: dict, key: str) -> bool:
    return isinstance(row.get(key), int | float) and not isinstance(row.get(key), bool)


__all__ = ["BudgetError", "backbone_of", "choose", "pareto_front"]
