"""Prior calibration of the output bias from the devices' label counts and predicted class counts.

With label skew, the shared head's bias drifts with each round's label mix under an adaptive server
step, while the model's ranking (ROC AUC) stays put: the decision threshold, not the features, is what
moves (docs/experiments.md, stop 34). Devices report, per class, how many of a sample of their examples
carry the label and how many the received global predicts; one round's devices hold a label mix far
from the federation's under skew, so the server pools the counts over rounds (exponential decay,
~the last 1 / (1 − DECAY) rounds) and moves each class's bias by a fraction of log(labelled /
predicted) each round: an integral controller that settles where the global calls each class as
often as the federation's labels hold it. Hard predictions, not probability totals: a model that is
still unsure has compressed scores, and matching their soft totals would push every prediction to the
majority class (measured, stop 34).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np

from edge_sdk.protocol.statistics import PriorStatistics

DECAY = 0.9
"""Weight of the pooled sums of earlier rounds against the current round's."""
GAIN = 0.1
"""Fraction of the pooled log ratio log(n_c / p̂_c) added to the bias each round."""
MAX_STEP = 0.5
"""Largest change of any class's bias in one round (logits), whatever the round's devices send."""
COUNTS, PREDICTED = "calibration::counts", "calibration::predicted"
"""Server-state keys of the pooled sums (persisted and resumed with the optimizer's moments)."""


def calibration_step(pooled: MutableMapping[str, np.ndarray], priors: Sequence[tuple[float, PriorStatistics]]) -> np.ndarray:
    """Fold this round's (weight, statistics) pairs into `pooled` (weight ≤ 1 scales a device whose sample
    count the round bounded) and return the bias change GAIN · log((n_c + ½) / (p̂_c + ½)) of the pooled
    label counts n and predicted counts p̂, centred and clipped to ±MAX_STEP."""
    counts = sum(w * p.counts.astype(np.float64) for w, p in priors)
    predicted = sum(w * p.predicted for w, p in priors)
    if COUNTS in pooled:
        counts = DECAY * pooled[COUNTS] + counts
        predicted = DECAY * pooled[PREDICTED] + predicted
    pooled[COUNTS], pooled[PREDICTED] = counts, predicted
    step = GAIN * np.log((counts + 0.5) / (predicted + 0.5))
    return np.clip(step - step.mean(), -MAX_STEP, MAX_STEP)
