"""Aggregation strategies: pure functions (client updates, layer specs, tier ranks) → MergeResult, by name.

The registry says what each needs: a bundle with one frozen A for every device (ffa-lora), the
simulator because devices cannot run it (flora), or privacy settings and the server state (dp-fedavg).
"""

from __future__ import annotations

from aggregator.strategies.base import (
    ClientUpdate, LayerSpec, MergeError, MergeResult, Strategy, StrategySpec, SvdFactors,
)
from aggregator.strategies.dp_fedavg import dp_fedavg
from aggregator.strategies.fedavg_naive import fedavg_naive
from aggregator.strategies.ffa_lora import ffa_lora
from aggregator.strategies.flexlora import flexlora
from aggregator.strategies.flora import flora
from aggregator.strategies.hetlora import hetlora
from aggregator.strategies.svd_weighted import svd_weighted
from aggregator.strategies.trimmed_mean import trimmed_mean

STRATEGIES: dict[str, StrategySpec] = {
    "svd-weighted": StrategySpec(svd_weighted, "exact merge weighted by n_i·‖ΔW_i‖_F, best rank-r per tier",
                                 state="exact", server_optimizer="adafactor"),
    "fedavg-naive": StrategySpec(fedavg_naive, "A and B averaged separately (zero-padded), the inexact baseline",
                                 state="factors"),
    "hetlora": StrategySpec(hetlora, "zero-padded average weighted by ‖B_i A_i‖_F", state="factors"),
    "flexlora": StrategySpec(flexlora, "exact merge weighted by n_i, best rank-r per tier", state="exact"),
    "flora": StrategySpec(flora, "stacked factors folded into the base each round",
                          device_blocker="FLoRA folds each round into the frozen base weights, which a device "
                                         "cannot change", server_optimizer=None),
    "ffa-lora": StrategySpec(ffa_lora, "A frozen and shared, B averaged", frozen_a=True, state="factors"),
    "trimmed-mean": StrategySpec(trimmed_mean, "coordinate-wise trimmed mean of the clients' ΔW_i (robust to a few "
                                 "hostile devices), best rank-r per tier", state="exact"),
    "dp-fedavg": StrategySpec(dp_fedavg, "client-level differential privacy: each whole update clipped, the sum "
                              "noised, best rank-r per tier", state="exact", private=True,
                              server_optimizer=None),
}
DEFAULT_STRATEGY = "svd-weighted"


def get_strategy(name: str) -> StrategySpec:
    """The strategy registered under `name` (call it to merge)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"Unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}.") from None


__all__ = [
    "DEFAULT_STRATEGY", "STRATEGIES", "ClientUpdate", "LayerSpec", "MergeError", "MergeResult", "Strategy",
    "StrategySpec", "SvdFactors", "get_strategy",
]
