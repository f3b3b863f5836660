"""Feature statistics a device sums over its training examples, from which the server solves the head.

For the head's input features f (`Manifest.feature_width`) and labels y: the Gram matrix Σ f fᵀ, the
per-class sums Σ_{y=c} f and the per-class counts. Summed over devices they are exactly what a
central closed-form classifier needs, however the labels are spread over devices (Fed3R, arXiv
2406.01116; FedNCM, arXiv 2306.03937): the head then no longer follows the label mix of the round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StatisticsError(ValueError):
    """Statistics that no set of feature vectors could have produced, or of the wrong shape."""


@dataclass
class FeatureStatistics:
    """Σ f fᵀ (`gram`, width × width), Σ_{y=c} f (`sums`, classes × width), examples per class (`counts`)."""

    gram: np.ndarray
    sums: np.ndarray
    counts: np.ndarray

    @classmethod
    def zeros(cls, classes: int, width: int) -> FeatureStatistics:
        return cls(np.zeros((width, width)), np.zeros((classes, width)), np.zeros(classes, dtype=np.int64))

    @property
    def samples(self) -> int:
        return int(round(float(self.counts.sum())))

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate a batch: `features` (batch × width), `labels` (batch,) class indices."""
        f = features.astype(np.float64)
        self.gram += f.T @ f
        np.add.at(self.sums, labels, f)
        self.counts += np.bincount(labels, minlength=self.counts.size)

    def scaled(self, factor: float) -> FeatureStatistics:
        """These statistics with every feature multiplied by `factor` (the counts unchanged)."""
        return FeatureStatistics(self.gram * factor**2, self.sums * factor, self.counts.copy())

    def weighed(self, factor: float) -> FeatureStatistics:
        """These statistics as if over `factor` times as many examples of the same distribution (float counts)."""
        return FeatureStatistics(self.gram * factor, self.sums * factor, self.counts * factor)

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(self.gram + other.gram, self.sums + other.sums, self.counts + other.counts)

    def check(self, classes: int, width: int) -> None:
        """Raise StatisticsError unless these could be sums over real feature vectors of this bundle.

        Shapes; finite values; non-negative counts; a class without examples has a zero sum; the Gram
        matrix is symmetric positive semi-definite; each class sum obeys Cauchy–Schwarz,
        ‖Σ_{y=c} f‖² ≤ n_c · trace(Σ f fᵀ).
        """
        if self.gram.shape != (width, width) or self.sums.shape != (classes, width) or self.counts.shape != (classes,):
            raise StatisticsError(f"Statistics shapes gram {self.gram.shape}, sums {self.sums.shape}, counts "
                                  f"{self.counts.shape}; this bundle needs ({width}, {width}), ({classes}, {width}), "
                                  f"({classes},).")
        if not (np.all(np.isfinite(self.gram)) and np.all(np.isfinite(self.sums))):
            raise StatisticsError("Statistics hold NaN or Inf.")
        if self.counts.min() < 0 or self.samples < 1:
            raise StatisticsError("Statistics counts must be non-negative and sum to at least one example.")
        gram = self.gram.astype(np.float64)
        trace = float(np.trace(gram))
        if not np.allclose(gram, gram.T, rtol=0, atol=1e-6 * max(trace, 1e-30)):
            raise StatisticsError("The statistics' Gram matrix is not symmetric.")
        if float(np.linalg.eigvalsh(gram)[0]) < -1e-4 * max(trace, 1e-30):
            raise StatisticsError("The statistics' Gram matrix is not positive semi-definite.")
        squares = np.sum(self.sums.astype(np.float64) ** 2, axis=1)
        if np.any(squares > self.counts * trace * (1 + 1e-4) + 1e-12):
            raise StatisticsError("A class sum is larger than its count and the Gram matrix allow.")



@dataclass
class PriorStatistics:
    """Per class, how many of a device's examples carry that label (`counts`) and how many of the same
    examples the received global predicts to be of it (`predicted`). Summed over devices and rounds they
    tell the server whether the shared head calls each class as often as the federation's labels hold it,
    which label skew and adaptive server steps otherwise leave drifting (prior matching)."""

    counts: np.ndarray
    predicted: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def check(self, classes: int) -> None:
        """Raise StatisticsError unless these could come from `classes`-way predictions of real examples:
        shapes, finite non-negative values, and predicted totals summing to the example count."""
        if self.counts.shape != (classes,) or self.predicted.shape != (classes,):
            raise StatisticsError(f"Prior statistics shapes counts {self.counts.shape}, predicted "
                                  f"{self.predicted.shape}; this bundle needs ({classes},) each.")
        if not np.all(np.isfinite(self.predicted)) or self.predicted.min() < 0 or self.counts.min() < 0:
            raise StatisticsError("Prior statistics must be finite and non-negative.")
        if self.samples < 1 or abs(float(self.predicted.sum()) - self.samples) > 1e-3 * self.samples + 1e-2:
            raise StatisticsError("Predicted class totals must sum to the example count (at least one).")
