"""A round's merge: LoRA factors by the chosen strategy, the shared task head by sample-weighted FedAvg."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.strategies import ClientUpdate, MergeResult, get_strategy
from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.protocol import AdapterHeader
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.manifest import Manifest


def check_strategy(name: str, manifest: Manifest | None = None) -> None:
    """Raise ValueError for an unknown strategy, one the device protocol cannot run, or one `manifest` does not suit."""
    try:
        spec = get_strategy(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    if manifest is not None and spec.frozen_a != (manifest.lora.frozen_a_seed is not None):
        raise ValueError(f"{name} needs every device to hold the same frozen A (`fedpeft-export --freeze-lora-a`), "
                         "and a bundle with frozen A suits ffa-lora only; export the bundle to match the strategy."
                         if spec.frozen_a else
                         f"This bundle freezes LoRA A (--freeze-lora-a), which suits ffa-lora only, not {name}; "
                         "export the bundle to match the strategy.")
    if manifest is not None and manifest.lora.full_finetune:
        raise ValueError("This bundle trains every model weight (--full-finetune); the protocol carries adapters. "
                         "Run it with `fedpeft-sim run --strategy full-fedavg`, or export a LoRA bundle.")
    if spec.device_blocker is not None:
        raise ValueError(f"Strategy '{name}' cannot run on devices: {spec.device_blocker}. Choose another "
                         "--strategy; its merge function stays available in aggregator.strategies.")


def merge_round(
    strategy: str, updates: Mapping[str, tuple[AdapterHeader, Adapter]], manifest: Manifest
) -> tuple[dict[int, Adapter], MergeResult]:
    """Per-tier global adapters (LoRA + averaged head) from accepted updates, in client-id order.

    Sorting makes the result independent of arrival order bit for bit, which is what lets a
    restarted aggregator reproduce an uninterrupted run exactly.
    """
    ordered = [updates[cid] for cid in sorted(updates)]
    client_updates = [
        ClientUpdate(client_id=h.client_id, rank=a.rank, num_samples=h.num_samples, factors=a.lora) for h, a in ordered
    ]
    result = get_strategy(strategy)(client_updates, layer_specs_from_manifest(manifest), manifest.ranks)
    head = _average_heads(ordered)
    tiers = {rank: Adapter(rank=rank, lora=dict(lora), head=head) for rank, lora in result.tiers.items()}
    return tiers, result


def _average_heads(ordered: list[tuple[AdapterHeader, Adapter]]) -> dict[str, np.ndarray]:
    """FedAvg of the heads that were sent, weighted by sample count; empty when the head stays local."""
    with_head = [(h.num_samples, a.head) for h, a in ordered if a.head]
    if not with_head:
        return {}
    total = float(sum(n for n, _ in with_head))
    return {
        name: sum((n / total) * head[name].astype(np.float64) for n, head in with_head).astype(np.float32)
        for name in with_head[0][1]
    }
