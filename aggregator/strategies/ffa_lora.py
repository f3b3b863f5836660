"""ffa-lora (Sun et al., 2024): A frozen at a shared random initialization, only B is averaged.

With A shared, Σ w_i B_i A = (Σ w_i B_i) A is exact and linear in the uploads, which is what lets it
compose with secure aggregation. Heterogeneous ranks share the first r rows of one A. A client whose
A differs from the shared one broke the protocol and is rejected. Each B_i (or its update) is first
scaled down to at most `bounds.NORM_CAP` × the layer's low median norm, and no share exceeds
`bounds.SHARE_CAP` × the low median share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.bounds import capped_shares, norm_clip
from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.linalg import svd_of_product
from aggregator.strategies.validate import accepted_or_raise

A_TOLERANCE = 1e-6


def ffa_lora(updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int]) -> MergeResult:
    """B_g = Σ (n_i/Σn) pad(B_i); tier r gets (A_shared[:r], B_g[:, :r])."""
    accepted, rejected, _ = accepted_or_raise(updates, layers, ranks)
    reference = max(sorted(accepted, key=lambda u: u.client_id), key=lambda u: u.rank)
    shared = {name: reference.factors[name][0] for name in layers}
    kept = []
    for u in accepted:
        if all(np.allclose(u.factors[n][0], shared[n][: u.rank], atol=A_TOLERANCE, rtol=0) for n in layers):
            kept.append(u)
        else:
            rejected[u.client_id] = "A differs from the federation's shared frozen A (ffa-lora trains B only)"
    top = reference.rank
    n = np.array([u.num_samples for u in kept], dtype=np.float64)
    w = capped_shares(n / n.sum())
    tiers: dict[int, dict] = {r: {} for r in sorted(set(ranks))}
    global_state, weights = {}, {}
    for name, spec in layers.items():
        deltas = [u.factors[name][1] - (u.sent[name][1] if u.sent is not None else 0.0) for u in kept]
        clip = norm_clip(np.array([np.linalg.norm(d) for d in deltas]))
        b_g = np.zeros((spec.out_features, top))
        for wi, ci, u, d in zip(w, clip, kept, deltas):
            b_g[:, : u.rank] += wi * ci * d
        a = shared[name]
        for r in tiers:
            a_r = np.zeros((r, spec.in_features), dtype=a.dtype)
            b_r = np.zeros((spec.out_features, r), dtype=a.dtype)
            k = min(r, top)
            a_r[:k], b_r[:, :k] = a[:k], b_g[:, :k]
            tiers[r][name] = (a_r, b_r)
        (global_state[name],) = svd_of_product((spec.scaling(top) * b_g)[None], a[None].astype(np.float64))
        weights[name] = {u.client_id: float(x) for u, x in zip(kept, w)}
    return MergeResult(tiers=tiers, global_state=global_state, weights=weights, rejected=rejected)
