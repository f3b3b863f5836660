"""fedavg-naive: data-size-weighted average of zero-padded A and B separately (the common, inexact practice)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.zero_pad import merge_padded


def fedavg_naive(updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int]) -> MergeResult:
    """A_g = Σ (n_i/Σn) pad(A_i), B_g likewise; truncated to each tier."""
    return merge_padded(updates, layers, ranks, lambda n, _norms: n / n.sum())
