"""Prior calibration of each tier's output bias from the devices' label counts and predicted class counts.

With label skew, the shared head's bias drifts with each round's label mix under an adaptive server
step, while the model's ranking (ROC AUC) stays put: the decision threshold, not the features, is what
moves (docs/experiments.md, stop 34). Devices report, per class, how many of a sample of their examples
carry the label and how many the global of their tier predicts; one round's devices hold a label mix far
from the federation's under skew, so the server pools the counts over rounds (exponential decay,
~the last 1 / (1 − DECAY) rounds) and moves each class's bias by a fraction of log(labelled /
predicted) each round: an integral controller that settles where the global calls each class as
often as the federation's labels hold it. Hard predictions, not probability totals: a model that is
still unsure has compressed scores, and matching their soft totals would push every prediction to the
majority class (measured, stop 34). Each rank-r truncation of ΔW_g shifts the scores its own way (at one
shared bias the round-300 globals of a run called 68% of the training pool positive at r=2 and 53% at r=16,
against 58% labelled), so each tier's global also gets an offset from its own devices' counts, zero-mean
over tiers. Offsets that also carried the common part fought the devices' training of the shared bias
and ran to ±3.6 logits within 125 rounds (measured, stop 35): the common part stays on the bias.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np

from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.statistics import PriorStatistics

DECAY = 0.9
"""Weight of the pooled sums of earlier rounds against the current round's."""
GAIN = 0.1
"""Fraction of the pooled log ratio log(n_c / p̂_c) added to the bias each round."""
MAX_STEP = 0.5
"""Largest change of any class's bias or offset in one round (logits), whatever the round's devices send."""
LIMIT = 4.0
"""Largest offset of any class (logits): over ten times the tier shifts measured (≤ 0.3), so devices that
keep reporting one class unpredicted cannot drive a tier's bias without bound."""
COUNTS, PREDICTED = "calibration::counts", "calibration::predicted"
"""Server-state keys of the pooled sums over all tiers (persisted and resumed with the optimizer's moments)."""
TIER_COUNTS, TIER_PREDICTED, OFFSETS = "calibration::tier_counts", "calibration::tier_predicted", "calibration::offsets"
"""Server-state keys of the per-tier pooled sums and the tiers' offsets, one row per tier in ascending rank."""


def _pooled_step(pooled: MutableMapping[str, np.ndarray], keys: tuple[str, str], row: int | None,
                 pairs: Sequence[tuple[float, PriorStatistics]]) -> np.ndarray:
    """Fold `pairs` into the pooled sums under `keys` (one row of them when `row` is given) and return
    GAIN · log((n_c + ½) / (p̂_c + ½)) of the pooled counts, centred."""
    counts = sum(w * p.counts.astype(np.float64) for w, p in pairs)
    predicted = sum(w * p.predicted for w, p in pairs)
    old_counts = pooled[keys[0]] if row is None else pooled[keys[0]][row]
    old_predicted = pooled[keys[1]] if row is None else pooled[keys[1]][row]
    counts, predicted = DECAY * old_counts + counts, DECAY * old_predicted + predicted
    if row is None:
        pooled[keys[0]], pooled[keys[1]] = counts, predicted
    else:
        pooled[keys[0]][row], pooled[keys[1]][row] = counts, predicted
    step = GAIN * np.log((counts + 0.5) / (predicted + 0.5))
    return step - step.mean()


def calibration_step(pooled: MutableMapping[str, np.ndarray], ranks: Sequence[int],
                     priors: Sequence[tuple[int, float, PriorStatistics]]) -> tuple[np.ndarray, np.ndarray]:
    """Fold this round's (tier, weight, statistics) triples into `pooled` (weight ≤ 1 scales a device whose
    sample count the round bounded); return the step of the shared output bias and the tiers' new offsets
    (rows in ascending rank).

    The shared bias moves by the step of the counts pooled over all tiers, clipped to ±MAX_STEP, as the
    devices' own training moves it: one integrator on one parameter. Each tier that sent statistics moves
    its offset by how far its own step differs from that common one; the offsets are kept at zero mean
    over tiers (and within ±LIMIT), so they carry only the tiers' differences, which the devices' training
    of the shared head does not pull against. A tier that sent none keeps its sums and its offset, so a
    stale gap is not applied twice.
    """
    tiers = sorted(set(ranks))
    classes = priors[0][2].counts.shape[0]
    for key, shape in ((COUNTS, (classes,)), (PREDICTED, (classes,)), (TIER_COUNTS, (len(tiers), classes)),
                       (TIER_PREDICTED, (len(tiers), classes)), (OFFSETS, (len(tiers), classes))):
        pooled[key] = pooled[key].copy() if key in pooled else np.zeros(shape)
    common = _pooled_step(pooled, (COUNTS, PREDICTED), None, [(w, p) for _, w, p in priors])
    offsets = pooled[OFFSETS]
    for row, rank in enumerate(tiers):
        mine = [(w, p) for r, w, p in priors if r == rank]
        if mine:
            own = _pooled_step(pooled, (TIER_COUNTS, TIER_PREDICTED), row, mine)
            offsets[row] += np.clip(own - common, -MAX_STEP, MAX_STEP)
    pooled[OFFSETS] = np.clip(offsets - offsets.mean(axis=0), -LIMIT, LIMIT)
    return np.clip(common, -MAX_STEP, MAX_STEP), pooled[OFFSETS]


def with_offsets(tiers: MutableMapping[int, Adapter], offsets: np.ndarray, bias: str) -> None:
    """Add each tier's offset row (ascending rank) to the output bias of its adapter, in place."""
    for row, rank in enumerate(sorted(tiers)):
        tiers[rank].head[bias] = (tiers[rank].head[bias] + offsets[row]).astype(np.float32)
