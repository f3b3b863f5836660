"""Types shared by all strategies: client updates in, per-tier adapters and global state out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Factors = tuple[np.ndarray, np.ndarray]
"""One LoRA pair (A: r × in, B: out × r); ΔW = (alpha / r) · B @ A."""


OptimizerName = Literal["sgd", "adam", "yogi", "adafactor"]
"""The server optimizers (`aggregator.server_state.ServerOptimizer`)."""


@dataclass(frozen=True)
class LayerSpec:
    """Shape and LoRA alpha of one adapted layer, as the bundle manifest describes it."""

    name: str
    in_features: int
    out_features: int
    alpha: float
    constant: bool = False
    """Every tier scales by `alpha` itself (`fedpeft-export --scaling`), not by alpha / r."""

    def scaling(self, rank: int) -> float:
        return self.alpha if self.constant else self.alpha / rank


@dataclass(frozen=True)
class ClientUpdate:
    """One client's trained adapter at its tier rank, with its local sample count n_i."""

    client_id: str
    rank: int
    num_samples: int
    factors: Mapping[str, Factors]
    sent: Mapping[str, Factors] | None = None
    """The factors the client started from (the server's global at its tier) when the server holds the
    global state: the strategy then merges the client's update s·B·A − s·B⁰·A⁰, not its adapter."""


@dataclass(frozen=True)
class SvdFactors:
    """ΔW_g = U · diag(S) · Vᵀ with U (out × k), S (k), V (in × k)."""

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray

    def dense(self) -> np.ndarray:
        return (self.u * self.s) @ self.v.T


@dataclass
class MergeResult:
    """What a round's merge produces.

    tiers: rank → layer → (A, B) for clients of that tier.
    global_state: layer → factors of ΔW_g (for persistence and the next round).
    weights: layer → client id → aggregation weight (sums to 1 per layer; at most 1 for
        dp-fedavg, whose weight is the client's clip factor / the clients sampled).
    rejected: client id → why its update was not merged.
    base_delta: layer → (P, Q) with W += P @ Q, for strategies that fold the update into the
        frozen base (FLoRA); empty otherwise.
    head: the merged change of the head, for a strategy that merges it with the adapter
        (dp-fedavg); None: the head is averaged beside the strategy.
    """

    tiers: dict[int, dict[str, Factors]]
    global_state: dict[str, SvdFactors]
    weights: dict[str, dict[str, float]]
    rejected: dict[str, str] = field(default_factory=dict)
    base_delta: dict[str, Factors] = field(default_factory=dict)
    head: dict[str, np.ndarray] | None = None


Strategy = Callable[..., MergeResult]
"""(updates, layers, tier ranks, **strategy options) → MergeResult; options such as `global_rank` are keywords."""


class MergeError(Exception):
    """No update of the round could be merged."""


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its merge function and what it needs from the bundle and the devices.

    Calling the spec runs the merge, so `get_strategy(name)(updates, layers, ranks)` merges.
    """

    merge: Strategy
    summary: str
    frozen_a: bool = False
    """Needs every device to hold the same frozen A (`fedpeft-export --freeze-lora-a`); such a bundle suits it only."""
    device_blocker: str | None = None
    """Why devices cannot run it over the protocol (None: they can); its merge function is still callable."""
    state: Literal["exact", "factors"] | None = None
    """The form of the global it keeps when the server holds the state and steps it with a server optimizer
    (`aggregator.server_state`): ΔW_g itself, or top-rank factors; None: it cannot."""
    server_optimizer: OptimizerName | None = "adam"
    """The server optimizer `--server-opt auto` steps it with (svd-weighted's Adafactor and the others' Adam
    are what converged at α=0.1, docs/results.md); None: it needs an explicit choice or none."""
    private: bool = False
    """Differentially private: merges the head with the adapter, needs the privacy settings (clip, noise) and
    the server state, and takes no feature statistics (they would leave the devices in the clear)."""

    def __call__(self, updates: Sequence[ClientUpdate], layers: Mapping[str, LayerSpec], ranks: Sequence[int],
                 **options: object) -> MergeResult:
        return self.merge(updates, layers, ranks, **options)


def layer_specs_from_manifest(manifest) -> dict[str, LayerSpec]:
    """Layer specs from a bundle manifest (`edge_sdk.protocol.manifest.Manifest`)."""
    tier = manifest.tiers[0]
    constant = len(manifest.tiers) > 1 and len({t.lora_pairs[0].scaling for t in manifest.tiers}) == 1
    return {
        p.layer: LayerSpec(p.layer, p.a_shape[1], p.b_shape[0], p.scaling if constant else p.scaling * p.rank, constant)
        for p in tier.lora_pairs
    }
