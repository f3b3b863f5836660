"""Prior calibration of each tier's output bias from the devices' label counts and predicted class counts.

With label skew, the shared head's bias drifts with each round's label mix under an adaptive server
step, while the model's ranking (ROC AUC) stays put: the decision threshold, not the features, is what
moves (docs/experiments.md, stop 34). Devices report, per class, how many of a sample of their examples
carry the label and how many the global of their tier predicts; one round's devices hold a label mix far
from the federation's under skew, so the server pools the counts over rounds (exponential decay,
~the last 1 / (1 − DECAY) rounds) and moves each class's offset by a fraction of log(labelled /
predicted) each round: an integral controller that settles where the global calls each class as
often as the federation's labels hold it. Hard predictions, not probability totals: a model that is
still unsure has compressed scores, and matching their soft totals would push every prediction to the
majority class (measured, stop 34). One offset per tier, added to the shared bias in that tier's global
only: each rank-r truncation of ΔW_g shifts the scores its own way (at one shared offset the round-300
globals of a run called 68% of the training pool positive at r=2 and 53% at r=16, against 58% labelled).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np

from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.statistics import PriorStatistics

DECAY = 0.9
"""Weight of the pooled sums of earlier rounds against the current round's."""
GAIN = 0.1
"""Fraction of the pooled log ratio log(n_c / p̂_c) added to the offset each round."""
MAX_STEP = 0.5
"""Largest change of any class's offset in one round (logits), whatever the round's devices send."""
LIMIT = 4.0
"""Largest offset of any class (logits): over ten times the tier shifts measured (≤ 0.3), so devices that
keep reporting one class unpredicted cannot drive a tier's bias without bound."""
COUNTS, PREDICTED, OFFSETS = "calibration::counts", "calibration::predicted", "calibration::offsets"
"""Server-state keys of the pooled sums and the offsets, one row per tier in ascending rank (persisted and
resumed with the optimizer's moments)."""


def calibration_step(pooled: MutableMapping[str, np.ndarray], ranks: Sequence[int],
                     priors: Sequence[tuple[int, float, PriorStatistics]]) -> np.ndarray:
    """Fold this round's (tier, weight, statistics) triples into `pooled` (weight ≤ 1 scales a device whose
    sample count the round bounded) and return the tiers' new offsets (rows in ascending rank).

    A tier that sent statistics moves its offset by GAIN · log((n_c + ½) / (p̂_c + ½)) of its pooled label
    counts n and predicted counts p̂, centred and clipped to ±MAX_STEP (the offset to ±LIMIT); a tier that sent none this round
    keeps its sums and its offset, so a stale gap is not applied twice.
    """
    tiers = sorted(set(ranks))
    classes = priors[0][2].counts.shape[0]
    counts = pooled.get(COUNTS, np.zeros((len(tiers), classes)))
    predicted = pooled.get(PREDICTED, np.zeros((len(tiers), classes)))
    offsets = pooled.get(OFFSETS, np.zeros((len(tiers), classes))).copy()
    counts, predicted = counts.copy(), predicted.copy()
    for row, rank in enumerate(tiers):
        mine = [(w, p) for r, w, p in priors if r == rank]
        if not mine:
            continue
        counts[row] = DECAY * counts[row] + sum(w * p.counts.astype(np.float64) for w, p in mine)
        predicted[row] = DECAY * predicted[row] + sum(w * p.predicted for w, p in mine)
        step = GAIN * np.log((counts[row] + 0.5) / (predicted[row] + 0.5))
        offsets[row] = np.clip(offsets[row] + np.clip(step - step.mean(), -MAX_STEP, MAX_STEP), -LIMIT, LIMIT)
    pooled[COUNTS], pooled[PREDICTED], pooled[OFFSETS] = counts, predicted, offsets
    return offsets


def with_offsets(tiers: MutableMapping[int, Adapter], offsets: np.ndarray, bias: str) -> None:
    """Add each tier's offset row (ascending rank) to the output bias of its adapter, in place."""
    for row, rank in enumerate(sorted(tiers)):
        tiers[rank].head[bias] = (tiers[rank].head[bias] + offsets[row]).astype(np.float32)
