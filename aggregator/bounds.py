"""Bounds on what devices send: sample counts, update norms and merge shares at most a cap × the round's median."""

from __future__ import annotations

import numpy as np

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


NORM_CAP = 2.0
"""An update counts with at most this many times the low median of its layer's update norms in the round.
The norm is the server's own ‖ΔW_i‖_F, but the device chooses ΔW_i: an honest update ×1000 would
otherwise take ~99% of svd-weighted's n·‖ΔW‖ weights. svd-weighted counts the norm twice (in the weight
and in ΔW_i itself), so a cap of c lets a bounded update move ΔW_g like c² median devices: one round of 9
honest devices and one sending label-flipped LoRA ×10 ended at 0.600 accuracy with c = 4, 0.774 with c = 2,
against 0.792 when the tenth device is honest (benchmarks/bench_attacks.py, docs/experiments.md stop 33). Honest outliers exist too (stop 18, α=0.1: one device's
update at 33× the round's median); they count as 2× the median."""


def norm_clip(norms: np.ndarray, cap: float = NORM_CAP) -> np.ndarray:
    """Factors in (0, 1] per (layer, client) of `norms` (layers × clients) that scale each update down to
    at most `cap` × its layer's low median norm (1 where that median is 0)."""
    norms = np.asarray(norms, dtype=np.float64)
    limit = cap * np.sort(norms, axis=-1)[..., (norms.shape[-1] - 1) // 2][..., None]
    return np.where((norms > limit) & (limit > 0), limit / np.where(norms > 0, norms, 1.0), 1.0)


SHARE_CAP = 2.0
"""A client's share of a merge is at most this many times the round's low median share. The sample and
norm caps compound in svd-weighted's n·‖ΔW‖ weights: one device that claimed 10^6 samples and sent
label-flipped LoRA ×10 took 8/17 of the weight under the two caps alone (accuracy 0.792 → 0.704,
docs/experiments.md stop 33). With this cap one device of k holds at most 2 / (k + 1) of any merge."""


def capped_shares(weights: np.ndarray, cap: float = SHARE_CAP) -> np.ndarray:
    """`weights` (rows summing to 1 along the last axis) with each entry clipped to `cap` × its row's low
    median, the rows summed to 1 again (rows whose low median is 0 are left as they are)."""
    weights = np.asarray(weights, dtype=np.float64)
    limit = cap * np.sort(weights, axis=-1)[..., (weights.shape[-1] - 1) // 2][..., None]
    clipped = np.where(limit > 0, np.minimum(weights, limit), weights)
    return clipped / clipped.sum(axis=-1, keepdims=True)
