"""Medians and ranges of repeated runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Typography of the results file, spelled as escapes so the source stays ASCII-clear.
TIMES = "\u00d7"  # multiplication sign: 1.25x
DASH = "\u2013"  # en dash: ranges, 9,100-9,400


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side was not measured."""
    if a is None or not b:
        return None
    return a / b
