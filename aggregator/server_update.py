"""Server-side update rule (FedAvgM, Hsu et al. 2019; the FedOpt family of Reddi et al. 2021) on ΔW_g.

Without a rule the strategy's merge replaces the global: G_t = M_t. With one, the server treats
the round as a pseudo-gradient against where each client started:

    Δ_t = M_t − Σ_i w_i · T_{r_i}(G_{t−1})     T_r: top-r truncation, what a tier-r client received
    m_t = β · m_{t−1} + Δ_t                    G_t = G_{t−1} + η · m_t   (both kept at rank `rank`)

Because G_{t−1} is held as its SVD, Σ_i w_i T_{r_i}(G_{t−1}) = U diag(c ⊙ s) Vᵀ with c_j the weight
of the clients whose tier includes component j: components that low-tier clients never received
are kept, not shrunk toward zero. With one tier, η = 1 and β = 0 this equals replacement. The
shared head follows the same rule densely. Only for strategies whose merge is the weighted sum
Σ w_i ΔW_i (svd-weighted, flexlora); everything stays in factored form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator.strategies.base import Factors, LayerSpec, MergeResult, SvdFactors
from aggregator.strategies.linalg import redistribute, svd_of_product

EXACT_STRATEGIES = ("svd-weighted", "flexlora")


@dataclass(frozen=True)
class ServerOptimizer:
    """Server learning rate η and momentum β; `rank` caps the global and the momentum (default: largest tier)."""

    lr: float = 1.0
    momentum: float = 0.0
    rank: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"Server lr must be > 0 and momentum in [0, 1); got lr={self.lr}, momentum={self.momentum}.")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"Server rank must be at least 1; got {self.rank}.")


@dataclass
class ServerState:
    """The global G (per layer, factored), its momentum, and the shared head with its momentum."""

    global_factors: dict[str, SvdFactors]
    momentum: dict[str, SvdFactors]
    head: dict[str, np.ndarray] = field(default_factory=dict)
    head_momentum: dict[str, np.ndarray] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat name → array map for safetensors (float32)."""
        out: dict[str, np.ndarray] = {}
        for prefix, group in (("global", self.global_factors), ("momentum", self.momentum)):
            for layer, f in group.items():
                for part, value in (("U", f.u), ("S", f.s), ("V", f.v)):
                    out[f"{prefix}/{layer}::{part}"] = np.ascontiguousarray(value, dtype=np.float32)
        for prefix, group in (("head", self.head), ("head_momentum", self.head_momentum)):
            for name, value in group.items():
                out[f"{prefix}/{name}"] = np.ascontiguousarray(value, dtype=np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray]) -> ServerState:
        """Inverse of `to_tensors`; raises ValueError on a key it does not know."""
        groups: dict[str, dict] = {"global": {}, "momentum": {}, "head": {}, "head_momentum": {}}
        for key, value in tensors.items():
            prefix, _, name = key.partition("/")
            if prefix not in groups or not name:
                raise ValueError(f"Unknown server-state tensor '{key}'.")
            groups[prefix][name] = value
        factored = {}
        for prefix in ("global", "momentum"):
            layers = {name.rsplit("::", 1)[0] for name in groups[prefix]}
            factored[prefix] = {
                layer: SvdFactors(groups[prefix][f"{layer}::U"], groups[prefix][f"{layer}::S"], groups[prefix][f"{layer}::V"])
                for layer in layers
            }
        return cls(factored["global"], factored["momentum"], groups["head"], groups["head_momentum"])


def initial_state(layers: Mapping[str, LayerSpec], head: Mapping[str, np.ndarray]) -> ServerState:
    """Round 0: ΔW = 0 (LoRA starts with B = 0), zero momentum, the bundle's initial head."""
    empty = {name: _zero(spec) for name, spec in layers.items()}
    return ServerState(dict(empty), dict(empty), {k: np.asarray(v, np.float32) for k, v in head.items()},
                       {k: np.zeros_like(v, dtype=np.float32) for k, v in head.items()})


def apply_update(
    rule: ServerOptimizer,
    previous: ServerState,
    result: MergeResult,
    client_ranks: Mapping[str, int],
    merged_head: Mapping[str, np.ndarray],
    layers: Mapping[str, LayerSpec],
    ranks: Sequence[int],
) -> tuple[dict[int, dict[str, Factors]], ServerState]:
    """The new state and each tier's best rank-r factors of the new global."""
    keep = rule.rank or max(ranks)
    eta, beta = rule.lr, rule.momentum
    new_global: dict[str, SvdFactors] = {}
    new_momentum: dict[str, SvdFactors] = {}
    for name in layers:
        g, m, merged = previous.global_factors[name], previous.momentum[name], result.global_state[name]
        received = _received_share(result.weights[name], client_ranks, g.s.shape[0])
        delta_terms = [(merged, 1.0), (SvdFactors(g.u, received * g.s, g.v), -1.0), (m, beta)]
        (new_momentum[name],) = _sum_of_factors(delta_terms, keep)
        (new_global[name],) = _sum_of_factors([(g, 1.0), (new_momentum[name], eta)], keep)
    head_momentum = {k: beta * previous.head_momentum[k] + (merged_head[k] - previous.head[k]) for k in merged_head}
    head = {k: previous.head[k] + eta * head_momentum[k] for k in merged_head}
    tiers = {r: {name: redistribute(new_global[name], r, layers[name].scaling(r)) for name in layers}
             for r in sorted(set(ranks))}
    return tiers, ServerState(new_global, new_momentum, head, head_momentum)


def _received_share(weights: Mapping[str, float], client_ranks: Mapping[str, int], k: int) -> np.ndarray:
    """c_j: the total weight of clients whose tier rank exceeds j (they received component j)."""
    share = np.zeros(k)
    for client, w in weights.items():
        share[: min(client_ranks[client], k)] += w
    return share


def _sum_of_factors(terms: Sequence[tuple[SvdFactors, float]], keep: int) -> list[SvdFactors]:
    """SVD of Σ coef · U diag(s) Vᵀ, truncated to `keep`, without forming the dense matrix when smaller."""
    dtype = np.result_type(*(f.u.dtype for f, _ in terms), np.float32)
    p = np.concatenate([(f.u * (coef * f.s)).astype(dtype) for f, coef in terms], axis=1)
    q = np.concatenate([f.v.T.astype(dtype) for f, _ in terms], axis=0)
    return svd_of_product(p[None], q[None], keep)


def _zero(spec: LayerSpec) -> SvdFactors:
    return SvdFactors(np.zeros((spec.out_features, 0), np.float32), np.zeros(0, np.float32),
                      np.zeros((spec.in_features, 0), np.float32))
