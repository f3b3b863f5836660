"""Bounds on what devices report about themselves: their sample counts weigh at most a cap × the round's median."""

from __future__ import annotations

SAMPLE_CAP = 4.0
"""A client's sample count weighs at most this many times the round's low median: n is self-reported,
so one device claiming 10^6 samples would otherwise own the merge (legitimate size skew at σ 0.5
stays under 3× the median)."""


def bounded_counts(counts: list[int], cap: float = SAMPLE_CAP) -> list[int]:
    """Each count clipped to `cap` × the low median of `counts` (the median itself when the round is odd)."""
    if not counts:
        return []
    limit = max(1, int(cap * sorted(counts)[(len(counts) - 1) // 2]))
    return [min(n, limit) for n in counts]
