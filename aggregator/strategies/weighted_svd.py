"""The shared exact merge: ΔW_g = Σ w_i s_i B_i A_i in factored form, then per-tier truncation.

svd-weighted and flexlora differ only in the client weights they pass in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult, SvdFactors
from aggregator.strategies.linalg import product_norms, redistribute, svd_of_product
from aggregator.strategies.validate import split_valid

WeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(n: (N,), norms: (L, N)) → weights (L, N), each row summing to 1."""


class MergeError(Exception):
    """No update of the round could be merged."""


def merge_exact(
    updates: Sequence[ClientUpdate],
    layers: Mapping[str, LayerSpec],
    ranks: Sequence[int],
    weight_fn: WeightFn,
    global_rank: int | None = None,
) -> MergeResult:
    """Validate, weight and merge; each tier gets the best rank-r factors of ΔW_g."""
    accepted, rejected = split_valid(updates, layers, ranks)
    if not accepted:
        raise MergeError(f"no valid update to merge; rejected: {rejected}")
    n = np.array([u.num_samples for u in accepted], dtype=np.float64)
    global_state: dict[str, SvdFactors] = {}
    weights: dict[str, dict[str, float]] = {}
    for group in _shape_groups(layers).values():
        dtype = np.result_type(*(u.factors[group[0]][0].dtype for u in accepted))
        b = [np.stack([u.factors[name][1] for name in group]).astype(dtype, copy=False) for u in accepted]
        a = [np.stack([u.factors[name][0] for name in group]).astype(dtype, copy=False) for u in accepted]
        scales = [layers[group[0]].scaling(u.rank) for u in accepted]
        norms = _norms(accepted, scales, b, a)
        w = weight_fn(n, norms)
        p = np.concatenate([(w[:, i] * scales[i])[:, None, None].astype(dtype) * b[i] for i in range(len(b))], axis=2)
        q = np.concatenate(a, axis=1)
        for name, row, factors in zip(group, w, svd_of_product(p, q, global_rank)):
            global_state[name] = factors
            weights[name] = {u.client_id: float(x) for u, x in zip(accepted, row)}
    tiers = {
        r: {name: redistribute(global_state[name], r, layers[name].scaling(r)) for name in layers}
        for r in sorted(set(ranks))
    }
    return MergeResult(tiers=tiers, global_state=global_state, weights=weights, rejected=rejected)


def normalized(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of `values` scaled to sum to 1; rows that sum to 0 use `fallback` instead."""
    values = np.asarray(values, dtype=np.float64)
    fallback = np.broadcast_to(np.asarray(fallback, dtype=np.float64), values.shape)
    totals = values.sum(axis=-1, keepdims=True)
    safe = np.where(totals > 0, values, fallback)
    return safe / safe.sum(axis=-1, keepdims=True)


def _norms(
    accepted: Sequence[ClientUpdate], scales: list[float], b: list[np.ndarray], a: list[np.ndarray]
) -> np.ndarray:
    """‖s_i B_i A_i‖_F per (layer, client), one batched QR per rank (one scaling s_r) instead of one per client."""
    norms = np.empty((b[0].shape[0], len(accepted)))
    by_rank: dict[int, list[int]] = defaultdict(list)
    for index, update in enumerate(accepted):
        by_rank[update.rank].append(index)
    for indices in by_rank.values():
        stacked = product_norms(scales[indices[0]], np.concatenate([b[i] for i in indices]),
                                np.concatenate([a[i] for i in indices]))
        norms[:, indices] = stacked.reshape(len(indices), -1).T
    return norms


def _shape_groups(layers: Mapping[str, LayerSpec]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, spec in layers.items():
        groups[(spec.out_features, spec.in_features)].append(name)
    return groups
