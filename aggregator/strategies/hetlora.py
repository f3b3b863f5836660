"""hetlora (Cho et al., 2024): zero-padded A and B averaged with weights ∝ ‖B_i A_i‖_F, truncated per client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.zero_pad import merge_padded


def hetlora(updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int]) -> MergeResult:
    """Sparsity-weighted aggregation: larger updates count more; all-zero updates weigh equally."""
    return merge_padded(updates, layers, ranks, _weights)


def _weights(n: np.ndarray, norms: np.ndarray) -> np.ndarray:
    total = norms.sum()
    return norms / total if total > 0 else np.full_like(norms, 1.0 / norms.size)
