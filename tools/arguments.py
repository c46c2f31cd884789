"""Types for the tools' command-line numbers: each is checked at the door, and argparse's error (exit status 2)
names the flag, what it expects and what it got, e.g. ``argument --repeats: expected an integer >= 1, got '0'``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``; ``why`` says what needs it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}{reason}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_above(minimum: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number ``> minimum`` (``>=`` with ``inclusive``)."""
    sign = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a finite number {sign} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"number {sign} {minimum:g}"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: any finite number (a metric threshold, say)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


positive_int = int_at_least(1)  # counts, batches, repeats, patch and image sizes
positive_float = float_above(0.0)  # budgets in ms or GFLOPs
non_negative_float = float_above(0.0, inclusive=True)  # tolerances

__all__ = ["finite_float", "float_above", "int_at_least", "non_negative_float", "positive_float", "positive_int"]
