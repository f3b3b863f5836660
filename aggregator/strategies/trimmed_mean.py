"""trimmed-mean: the coordinate-wise trimmed mean of the clients' ΔW_i (Yin et al., 2018), best rank-r per tier.

A robust baseline for hostile devices: per entry of each layer's ΔW, the largest and smallest
⌊TRIM·k⌋ of the k clients' values are dropped and the rest averaged, so up to that many devices
cannot move an entry beyond the honest range, whatever they send. Sample counts are not used (a
self-reported count would reopen the door the trimming closes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult, SvdFactors
from aggregator.strategies.linalg import redistribute
from aggregator.strategies.validate import accepted_or_raise

TRIM = 0.2
"""Fraction of the clients trimmed from each end per entry (⌊0.2·k⌋: none below 5 clients, 2 of 10)."""


def trimmed_mean(updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int],
                 trim: float = TRIM) -> MergeResult:
    """ΔW_g = entrywise mean of the clients' ΔW_i (or updates) without the ⌊trim·k⌋ highest and lowest."""
    accepted, rejected, _ = accepted_or_raise(updates, layers, ranks)
    cut = int(trim * len(accepted))
    dtype = np.result_type(*(u.factors[name][0].dtype for u in accepted for name in layers))
    global_state, weights = {}, {}
    for name, spec in layers.items():
        stack = np.stack([_delta(u, name, spec) for u in accepted])
        order = np.argsort(stack, axis=0, kind="stable")
        kept = order[cut:len(accepted) - cut]
        merged = np.take_along_axis(stack, kept, axis=0).mean(axis=0)
        u, s, vt = np.linalg.svd(merged, full_matrices=False)
        global_state[name] = SvdFactors(u.astype(dtype), s.astype(dtype), vt.T.astype(dtype))
        share = np.bincount(kept.ravel(), minlength=len(accepted)) / kept.size
        weights[name] = {c.client_id: float(x) for c, x in zip(accepted, share)}
    tiers = {r: {name: redistribute(global_state[name], r, layers[name].scaling(r)) for name in layers}
             for r in sorted(set(ranks))}
    return MergeResult(tiers=tiers, global_state=global_state, weights=weights, rejected=rejected)


def _delta(update: ClientUpdate, name: str, spec: LayerSpec) -> np.ndarray:
    """s·B·A of the client's adapter, minus the same of what it was sent when the server holds the state."""
    a, b = (x.astype(np.float64) for x in update.factors[name])
    dense = spec.scaling(update.rank) * b @ a
    if update.sent is not None:
        a0, b0 = (x.astype(np.float64) for x in update.sent[name])
        dense -= spec.scaling(update.rank) * b0 @ a0
    return dense
