"""Aggregation strategies: pure functions (client updates, layer specs, tier ranks) → MergeResult, by name."""

from __future__ import annotations

from aggregator.strategies.base import ClientUpdate, LayerSpec, MergeResult, Strategy, SvdFactors
from aggregator.strategies.fedavg_naive import fedavg_naive
from aggregator.strategies.ffa_lora import ffa_lora
from aggregator.strategies.flexlora import flexlora
from aggregator.strategies.flora import flora
from aggregator.strategies.hetlora import hetlora
from aggregator.strategies.svd_weighted import svd_weighted
from aggregator.strategies.weighted_svd import MergeError

STRATEGIES: dict[str, Strategy] = {
    "svd-weighted": svd_weighted,
    "fedavg-naive": fedavg_naive,
    "hetlora": hetlora,
    "flexlora": flexlora,
    "flora": flora,
    "ffa-lora": ffa_lora,
}
DEFAULT_STRATEGY = "svd-weighted"


def get_strategy(name: str) -> Strategy:
    """The strategy registered under `name`."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"Unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}.") from None


__all__ = [
    "DEFAULT_STRATEGY", "STRATEGIES", "ClientUpdate", "LayerSpec", "MergeError", "MergeResult", "Strategy",
    "SvdFactors", "get_strategy",
]
