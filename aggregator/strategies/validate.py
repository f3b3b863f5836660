"""Validation of client updates before any merge: a bad update is rejected with a reason, never merged."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeError


def rejection_reason(update: ClientUpdate, layers: Mapping[str, LayerSpec], ranks: Sequence[int]) -> str | None:
    """Why `update` cannot be merged, or None when it is well formed."""
    if update.rank not in ranks:
        return f"rank {update.rank} is not an exported tier {sorted(ranks)}"
    if isinstance(update.num_samples, bool) or not isinstance(update.num_samples, (int, np.integer)) \
            or update.num_samples <= 0:
        return f"num_samples must be a positive integer, got {update.num_samples!r}"
    unknown = sorted(set(update.factors) - set(layers))
    if unknown:
        return f"unknown layers {unknown[:3]}"
    missing = sorted(set(layers) - set(update.factors))
    if missing:
        return f"missing layers {missing[:3]}"
    for name, (a, b) in update.factors.items():
        spec = layers[name]
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
            return f"{name}: factors must be numpy arrays"
        if a.dtype.kind != "f" or b.dtype.kind != "f":
            return f"{name}: factors must be floating point, got {a.dtype}/{b.dtype}"
        if a.shape != (update.rank, spec.in_features) or b.shape != (spec.out_features, update.rank):
            return (
                f"{name}: shapes A{a.shape} B{b.shape} do not match rank {update.rank} "
                f"(expected A({update.rank}, {spec.in_features}) B({spec.out_features}, {update.rank}))"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return f"{name}: factors contain NaN or Inf"
        if update.sent is not None and (name not in update.sent or update.sent[name][0].shape != a.shape
                                         or update.sent[name][1].shape != b.shape):
            return f"{name}: the factors the client was sent do not match its rank"
    return None


def split_valid(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int]
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """Accepted updates (first per client id) and the reasons for the rest."""
    accepted: list[ClientUpdate] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for update in updates:
        if update.client_id in seen:
            rejected[update.client_id] = "duplicate update from the same client"
            continue
        reason = rejection_reason(update, layers, ranks)
        if reason is None:
            accepted.append(update)
            seen.add(update.client_id)
        else:
            rejected[update.client_id] = reason
    return accepted, rejected


def accepted_or_raise(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int],
    order: Callable[[ClientUpdate], Any] | None = None,
) -> tuple[list[ClientUpdate], dict[str, str], np.ndarray]:
    """`split_valid`'s accepted updates (sorted by `order` if given), rejections and the accepted sample
    counts n (float64); raises MergeError when nothing can be merged."""
    accepted, rejected = split_valid(updates, layers, ranks)
    if not accepted:
        raise MergeError(f"no valid update to merge; rejected: {rejected}")
    if order is not None:
        accepted.sort(key=order)
    return accepted, rejected, np.array([u.num_samples for u in accepted], dtype=np.float64)
