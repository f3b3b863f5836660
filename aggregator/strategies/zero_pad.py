"""Shared core of the zero-padding baselines: average A and B separately at the largest rank.

This is inexact by construction: mean(B)·mean(A) ≠ mean(B·A) (the cross terms B_i A_j remain).
Each client's A and B (or their updates) are first scaled down to at most `bounds.NORM_CAP` × the
layer's low median norm, as the exact merges do with ΔW_i, and no share exceeds `bounds.SHARE_CAP` × the
low median share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aggregator.bounds import capped_shares, norm_clip
from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult
from aggregator.strategies.linalg import product_norms, svd_of_product
from aggregator.strategies.validate import accepted_or_raise

PadWeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(n: (N,), norms of B_i A_i: (N,)) → weights (N,) summing to 1."""


def merge_padded(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int], weight_fn: PadWeightFn
) -> MergeResult:
    """Per layer: A_g = Σ w_i pad(A_i), B_g = Σ w_i pad(B_i); tier r gets A_g[:r], B_g[:, :r].

    With `sent` factors the pads hold the updates A_i − A⁰, B_i − B⁰ instead (weights unchanged).
    """
    accepted, rejected, n = accepted_or_raise(updates, layers, ranks)
    top = max(ranks)
    tiers: dict[int, dict] = {r: {} for r in sorted(set(ranks))}
    global_state = {}
    weights = {}
    for name, spec in layers.items():
        a_pad = np.zeros((len(accepted), top, spec.in_features))
        b_pad = np.zeros((len(accepted), spec.out_features, top))
        for i, u in enumerate(accepted):
            a, b = u.factors[name]
            a0, b0 = u.sent[name] if u.sent is not None else (0.0, 0.0)
            a_pad[i, : u.rank] = a - a0
            b_pad[i, :, : u.rank] = b - b0
        a_pad *= norm_clip(np.linalg.norm(a_pad, axis=(1, 2)))[:, None, None]
        b_pad *= norm_clip(np.linalg.norm(b_pad, axis=(1, 2)))[:, None, None]
        norms = np.array([product_norms(1.0, b[None], a[None])[0] for a, b in (u.factors[name] for u in accepted)])
        norms *= norm_clip(norms)
        w = capped_shares(weight_fn(n, norms))
        a_g = np.tensordot(w, a_pad, axes=1)
        b_g = np.tensordot(w, b_pad, axes=1)
        dtype = accepted[0].factors[name][0].dtype
        for r in tiers:
            tiers[r][name] = (a_g[:r].astype(dtype), b_g[:, :r].astype(dtype))
        (global_state[name],) = svd_of_product((spec.scaling(top) * b_g)[None], a_g[None])
        weights[name] = {u.client_id: float(x) for u, x in zip(accepted, w)}
    return MergeResult(tiers=tiers, global_state=global_state, weights=weights, rejected=rejected)
