"""svd-weighted (FedPEFT's default): w_i = n_i‖ΔW_i‖_F / Σ_j n_j‖ΔW_j‖_F per layer, exact merge, truncated SVD.

The norms are computed here from A_i and B_i, never taken from the client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.exact_merge import merge_exact, normalized


def svd_weighted(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int],
    global_rank: int | None = None,
) -> MergeResult:
    """Merge heterogeneous-rank adapters weighted by data size × update magnitude."""
    return merge_exact(updates, layers, ranks, _weights, global_rank)


def _weights(n: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return normalized(n[None, :] * norms, n[None, :])
