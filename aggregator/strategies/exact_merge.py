"""The shared exact merge: ΔW_g = Σ w_i c_i s_i B_i A_i in factored form (c_i: the norm clip), then per-tier truncation.

svd-weighted and flexlora differ only in the client weights they pass in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from itertools import groupby

import numpy as np

from aggregator.bounds import capped_shares, norm_clip
from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult, SvdFactors
from aggregator.strategies.linalg import product_norms, redistribute, svd_of_product
from aggregator.strategies.validate import accepted_or_raise

WeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(n: (N,), norms: (L, N)) → weights (L, N), each row summing to 1."""


def merge_exact(
    updates: Sequence[ClientUpdate],
    layers: Mapping[str, LayerSpec],
    ranks: Sequence[int],
    weight_fn: WeightFn,
    global_rank: int | None = None,
) -> MergeResult:
    """Validate, weight and merge; each tier gets the best rank-r factors of ΔW_g.

    Each update is first scaled down to at most `bounds.NORM_CAP` × its layer's low median norm
    (`norm_clip`); the weights see the clipped norms, and no share exceeds `bounds.SHARE_CAP` × the
    layer's low median share (`capped_shares`).
    """
    accepted, rejected, n = accepted_or_raise(updates, layers, ranks, order=lambda u: u.rank)
    client_ranks = np.array([u.rank for u in accepted])
    widths = np.array([u.rank * (1 if u.sent is None else 2) for u in accepted])
    global_state: dict[str, SvdFactors] = {}
    weights: dict[str, dict[str, float]] = {}
    for group in _shape_groups(layers).values():
        pt, q = _stacked(accepted, group)
        scales = np.array([layers[group[0]].scaling(int(r)) for r in client_ranks])
        norms = _norms(pt, q, widths, scales)
        clip = norm_clip(norms)
        w = capped_shares(weight_fn(n, norms * clip))
        pt *= np.repeat(w * scales * clip, widths, axis=1)[:, :, None].astype(pt.dtype)
        for name, row, factors in zip(group, w, svd_of_product(np.swapaxes(pt, 1, 2), q, global_rank)):
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


def _stacked(accepted: Sequence[ClientUpdate], group: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pᵀ = [B_1ᵀ; …; B_Nᵀ] (L, R, out) and Q = [A_1; …; A_N] (L, R, in) for the layers of one shape group.

    P is kept transposed so that each client's B_iᵀ is a contiguous block of rows, like its A_i. A
    client with `sent` factors (A⁰, B⁰) contributes its update as [B_i, −B⁰]·[A_i; A⁰], 2·r_i rows.
    """
    dtype = np.result_type(*(u.factors[group[0]][0].dtype for u in accepted))
    a0, b0 = accepted[0].factors[group[0]]
    total = sum(u.rank * (1 if u.sent is None else 2) for u in accepted)
    pt = np.empty((len(group), total, b0.shape[0]), dtype=dtype)
    q = np.empty((len(group), total, a0.shape[1]), dtype=dtype)
    for index, name in enumerate(group):
        pairs = [pair for u in accepted for pair in _blocks(u, name)]
        np.concatenate([b.T for b, _ in pairs], axis=0, out=pt[index], casting="same_kind")
        np.concatenate([a for _, a in pairs], axis=0, out=q[index], casting="same_kind")
    return pt, q


def _blocks(update: ClientUpdate, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(B, A) pairs whose scaled products sum to what `update` contributes to layer `name`."""
    a, b = update.factors[name]
    if update.sent is None:
        return [(b, a)]
    a0, b0 = update.sent[name]
    return [(b, a), (-b0, a0)]


def _norms(pt: np.ndarray, q: np.ndarray, widths: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """‖s_i B_i A_i‖_F (or of the update) per (layer, client) from the unweighted stacks; clients come sorted
    by rank, so each width (one scaling s_r) is one batched product_norms over a contiguous block of rows."""
    layers = pt.shape[0]
    norms = np.empty((layers, len(widths)))
    first = row = 0
    for rank, run in groupby(widths.tolist()):
        count = len(list(run))
        rows = slice(row, row + count * rank)
        bt = pt[:, rows].reshape(layers, count, rank, pt.shape[2])
        a = q[:, rows].reshape(layers, count, rank, q.shape[2])
        norms[:, first:first + count] = product_norms(scales[first], np.swapaxes(bt, -1, -2), a)
        first, row = first + count, row + count * rank
    return norms


def _shape_groups(layers: Mapping[str, LayerSpec]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, spec in layers.items():
        groups[(spec.out_features, spec.in_features)].append(name)
    return groups
