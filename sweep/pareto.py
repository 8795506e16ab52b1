"""Pareto-optimal points of a two-objective sweep (loss vs compute): one small pure function.

A point dominates another when it is at least as good in every objective and strictly better in
one; the Pareto front is the set of points nothing dominates. Two identical points do not dominate
each other, so both stay on the front (a tie is reported, not broken by trial index). Which way is
"good" is per objective: ``minimize[i]`` True for a loss or a FLOP count, False for an accuracy.

Quadratic in the number of points, which is the number of completed trials of one sweep (tens to
hundreds): simpler to check than the sort-based algorithms and fast enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_optimal(points: Sequence[Sequence[float]], minimize: Sequence[bool]) -> list[int]:
    """Indices (into ``points``, ascending) of the points no other point dominates.

    Every point must have one finite value per objective; a NaN or an infinity is a ValueError
    naming the point, because a missing value can neither dominate nor be dominated honestly.
    """
    signs = [1.0 if m else -1.0 for m in minimize]
    keyed: list[tuple[float, ...]] = []
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ValueError(f"point {i}: has {len(p)} values, expected one per objective ({len(signs)})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p):
            raise ValueError(f"point {i}: every objective value must be a finite number, got {list(p)}")
        keyed.append(tuple(s * float(v) for s, v in zip(signs, p)))  # lower is better in every column
    return [i for i, a in enumerate(keyed) if not any(_dominates(b, a) for b in keyed)]


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` no worse than ``b`` everywhere and better somewhere (both oriented lower-is-better)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))
