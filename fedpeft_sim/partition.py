"""Splitting a labelled pool among simulated clients: IID, per-client Dirichlet label skew, size skew.

The Dirichlet split is the per-client variant: client k draws its label mix q_k ~ Dir(α·p), with
p the pool's class frequencies, and fills its share from the class pools. Unlike the per-class
split (a Dirichlet over clients for each class) it is not degenerate for 2 classes and 100
clients at α = 0.1, and as α → ∞ every q_k → p, i.e. IID. Every sample goes to exactly one client.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def client_sizes(total: int, clients: int, skew: float, rng: np.random.Generator, min_size: int = 1) -> np.ndarray:
    """Sample counts summing to `total`: equal shares at `skew` 0, log-normal(σ = skew) shares above it."""
    if clients < 1 or total < clients * min_size:
        raise ValueError(f"Cannot give {clients} clients at least {min_size} of {total} samples each.")
    if skew < 0:
        raise ValueError(f"Size skew must be ≥ 0, got {skew}.")
    shares = rng.lognormal(0.0, skew, clients) if skew > 0 else np.ones(clients)
    spare = total - clients * min_size
    sizes = min_size + np.floor(spare * shares / shares.sum()).astype(np.int64)
    for i in np.argsort(-shares)[: total - int(sizes.sum())]:
        sizes[i] += 1
    return sizes


def partition(
    labels: Sequence[int], clients: int, alpha: float | None, seed: int, size_skew: float = 0.0, min_size: int = 1
) -> list[np.ndarray]:
    """Indices into `labels` for each client; `alpha` None is IID, else the per-client Dirichlet split."""
    if alpha is not None and alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    sizes = client_sizes(len(labels), clients, size_skew, rng, min_size)
    if alpha is None:
        order = rng.permutation(len(labels))
        return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    prior = np.array([len(p) for p in pools], dtype=np.float64) / len(labels)
    parts = []
    for size in sizes:
        mix = rng.dirichlet(alpha * prior)
        counts = _draw(int(size), mix, np.array([len(p) for p in pools]), rng)
        parts.append(np.sort(np.array([pools[c].pop() for c in range(len(classes)) for _ in range(counts[c])],
                                      dtype=np.int64)))
    return parts


def _draw(size: int, mix: np.ndarray, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class counts for one client: multinomial by `mix`, the shortfall of exhausted classes from the rest."""
    counts = np.minimum(rng.multinomial(size, mix), available)
    while (short := size - int(counts.sum())) > 0:
        room = available - counts
        weights = np.where(room > 0, mix, 0.0)
        if weights.sum() <= 0:
            weights = room.astype(np.float64)
        counts += np.minimum(rng.multinomial(short, weights / weights.sum()), room)
    return counts


def histograms(labels: Sequence[int], parts: Sequence[np.ndarray], classes: int) -> list[list[int]]:
    """Per-client label counts, for the record of a run."""
    labels = np.asarray(labels)
    return [np.bincount(labels[p], minlength=classes).tolist() for p in parts]
