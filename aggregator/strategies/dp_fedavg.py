"""dp-fedavg (McMahan et al., arXiv 1710.06963): client-level differential privacy on the exact updates.

Each client's whole update — every layer's δ_i = s B_i A_i − s B⁰ A⁰ and its head's change — is
scaled to an L2 norm of at most `clip` jointly, the clipped updates are summed, Gaussian noise of
standard deviation noise_multiplier · clip is added to every entry, and the sum is divided by the
number of clients the round sampled (public, fixed before anyone trains), not by how many answered.
Weights are uniform: a weight that grows with a client's data or norm would raise its sensitivity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeError, MergeResult, SvdFactors
from aggregator.strategies.linalg import redistribute
from aggregator.strategies.validate import accepted_or_raise


def dp_fedavg(
    updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int], *,
    clip: float, noise_multiplier: float, sampled: int, rng: np.random.Generator,
    head_updates: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> MergeResult:
    """The noised mean of the clipped updates: ΔW per layer (as its SVD), the head's change in `head`.

    `head_updates`: client id → the change of its head tensors (empty or None where the head stays local).
    """
    accepted, rejected, _ = accepted_or_raise(updates, layers, ranks)
    if any(u.sent is None for u in accepted):
        raise MergeError("dp-fedavg clips each client's update against the global it was sent: run it with a "
                         "server optimizer (--server-opt).")
    if sampled < len(accepted):
        raise MergeError(f"{len(accepted)} updates merged from {sampled} sampled clients.")
    heads = head_updates or {}
    deltas = [{name: _delta(u, name, layers[name]) for name in layers} for u in accepted]
    head_deltas = [{k: np.asarray(v, dtype=np.float64) for k, v in heads.get(u.client_id, {}).items()}
                   for u in accepted]
    norms = np.array([np.sqrt(sum(float(np.sum(x * x)) for x in (*d.values(), *h.values())))
                      for d, h in zip(deltas, head_deltas)])
    factors = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
    sigma = noise_multiplier * clip
    global_state: dict[str, SvdFactors] = {}
    for name in layers:
        total = sum(f * d[name] for f, d in zip(factors, deltas))
        noised = (total + rng.normal(0.0, sigma, total.shape)) / sampled
        u, s, vt = np.linalg.svd(noised, full_matrices=False)
        global_state[name] = SvdFactors(u, s, vt.T)
    head: dict[str, np.ndarray] = {}
    for key in sorted(head_deltas[0]):
        total = sum(f * h[key] for f, h in zip(factors, head_deltas))
        head[key] = (total + rng.normal(0.0, sigma, np.shape(total))) / sampled
    tiers = {r: {name: redistribute(global_state[name], r, layers[name].scaling(r)) for name in layers}
             for r in sorted(set(ranks))}
    share = {u.client_id: float(f) / sampled for u, f in zip(accepted, factors)}
    return MergeResult(tiers=tiers, global_state=global_state, weights={name: dict(share) for name in layers},
                       rejected=rejected, head=head)


def _delta(update: ClientUpdate, name: str, spec: LayerSpec) -> np.ndarray:
    """s · (B A − B⁰ A⁰) in float64."""
    a, b = (x.astype(np.float64) for x in update.factors[name])
    a0, b0 = (x.astype(np.float64) for x in update.sent[name])
    return spec.scaling(update.rank) * (b @ a - b0 @ a0)
