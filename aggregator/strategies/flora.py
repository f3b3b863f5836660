"""flora (Wang et al., 2024): stack the clients' LoRA factors — an exact sum of any ranks — into the base.

ΔW_g = [w_1 s_1 B_1 … w_N s_N B_N] · [A_1; …; A_N] with w_i = n_i / Σn. Clients fold ΔW_g into their
frozen base weights and restart LoRA from a fresh initialization (B = 0). On device this maps onto
onnxruntime-training because frozen weights are checkpoint parameters too: the SDK writes W + ΔW_g
into the frozen buffer (copy_buffer_to_parameters with trainable_only=False) and resets the LoRA
tensors. The cost is the download: the stacked factors grow with Σ r_i every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.linalg import svd_of_product
from aggregator.strategies.validate import accepted_or_raise


def flora(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int], seed: int = 0
) -> MergeResult:
    """Exact stacked update in `base_delta`; tiers carry fresh LoRA (Kaiming-uniform A from `seed`, B = 0)."""
    accepted, rejected, n = accepted_or_raise(updates, layers, ranks, order=lambda u: u.client_id)
    w = n / n.sum()
    rng = np.random.default_rng(seed)
    base_delta, global_state, weights = {}, {}, {}
    tiers: dict[int, dict] = {r: {} for r in sorted(set(ranks))}
    for name, spec in layers.items():
        p = np.concatenate([w[i] * spec.scaling(u.rank) * u.factors[name][1] for i, u in enumerate(accepted)], axis=1)
        q = np.concatenate([u.factors[name][0] for u in accepted], axis=0)
        base_delta[name] = (p, q)
        (global_state[name],) = svd_of_product(p[None], q[None])
        weights[name] = {u.client_id: float(x) for u, x in zip(accepted, w)}
        bound = 1.0 / np.sqrt(spec.in_features)
        fresh = rng.uniform(-bound, bound, size=(max(ranks), spec.in_features)).astype(q.dtype)
        for r in tiers:
            tiers[r][name] = (fresh[:r].copy(), np.zeros((spec.out_features, r), dtype=q.dtype))
    return MergeResult(tiers=tiers, global_state=global_state, weights=weights, rejected=rejected,
                       base_delta=base_delta)
