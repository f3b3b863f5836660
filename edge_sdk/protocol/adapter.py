"""The adapter a device trains and exchanges: LoRA factors per layer and, optionally, the task head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_sdk.protocol.manifest import Manifest
from edge_sdk.protocol.statistics import FeatureStatistics, PriorStatistics

Factors = tuple[np.ndarray, np.ndarray]


@dataclass
class Adapter:
    """LoRA factors at one rank: layer → (A: r × in, B: out × r), ΔW = (alpha / r)·B·A.

    `head` maps the task head's parameter names (manifest vocabulary) to arrays; it is empty
    when the head is frozen or kept local to the device. `statistics`: the feature statistics of
    the examples a device trained on, when the federation asks for them (closed-form head); `prior`:
    its label counts and predicted class totals at the received global (prior calibration).
    """

    rank: int
    lora: dict[str, Factors]
    head: dict[str, np.ndarray] = field(default_factory=dict)
    statistics: FeatureStatistics | None = None
    prior: PriorStatistics | None = None

    @property
    def num_values(self) -> int:
        """Number of scalars carried (A, B and head)."""
        return sum(a.size + b.size for a, b in self.lora.values()) + sum(v.size for v in self.head.values())


def adapter_from_parameters(manifest: Manifest, rank: int, params: Mapping[str, np.ndarray], with_head: bool) -> Adapter:
    """Collect an adapter from trainable parameters named as in the training graph."""
    tier = manifest.tier(rank)
    lora = {p.layer: (np.array(params[p.a], dtype=np.float32), np.array(params[p.b], dtype=np.float32))
            for p in tier.lora_pairs}
    head = {name: np.array(params[name], dtype=np.float32) for name in manifest.head_parameters} if with_head else {}
    return Adapter(rank=rank, lora=lora, head=head)


def adapter_to_parameters(manifest: Manifest, adapter: Adapter) -> dict[str, np.ndarray]:
    """Graph parameter name → value for every tensor the adapter carries; checks layers and shapes."""
    tier = manifest.tier(adapter.rank)
    pairs = {p.layer: p for p in tier.lora_pairs}
    unknown = sorted(set(adapter.lora) - set(pairs))
    missing = sorted(set(pairs) - set(adapter.lora))
    if unknown or missing:
        raise ValueError(f"Adapter layers do not match the bundle: unknown {unknown[:3]}, missing {missing[:3]}.")
    out: dict[str, np.ndarray] = {}
    for layer, (a, b) in adapter.lora.items():
        pair = pairs[layer]
        if list(a.shape) != pair.a_shape or list(b.shape) != pair.b_shape:
            raise ValueError(
                f"Adapter layer {layer}: A {a.shape} / B {b.shape}, but tier r={tier.rank} needs "
                f"A {tuple(pair.a_shape)} / B {tuple(pair.b_shape)}."
            )
        out[pair.a], out[pair.b] = a, b
    unknown_head = sorted(set(adapter.head) - set(manifest.head_parameters))
    if unknown_head:
        raise ValueError(f"Adapter head tensors {unknown_head} are not trainable head parameters of this bundle.")
    for name, value in adapter.head.items():
        if list(value.shape) != manifest.head_shapes[name]:
            raise ValueError(f"Adapter head {name} has shape {value.shape}; the bundle needs {manifest.head_shapes[name]}.")
        out[name] = value
    return out
