"""flexlora (Bai et al., 2024): data-size weights on the full ΔW_i, SVD redistribution to each rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.exact_merge import merge_exact, normalized


def flexlora(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int],
    global_rank: int | None = None,
) -> MergeResult:
    """ΔW_g = Σ (n_i / Σn) ΔW_i, then each client gets the best rank-r_i approximation."""
    return merge_exact(updates, layers, ranks, _weights, global_rank)


def _weights(n: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return normalized(np.broadcast_to(n, norms.shape), n)
