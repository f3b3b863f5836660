"""full-fedavg: the communication reference — every client downloads and uploads all model weights."""

from __future__ import annotations

BYTES_PER_FLOAT32 = 4


def full_fedavg_round_bytes(total_parameters: int, clients: int, bytes_per_value: int = BYTES_PER_FLOAT32) -> int:
    """Bytes one round moves (down + up) when `clients` exchange the whole model."""
    return 2 * clients * total_parameters * bytes_per_value


def model_parameters(manifest) -> int:
    """Base + head parameters of a bundle (`edge_sdk.manifest.Manifest`): what full fine-tuning sends."""
    tier = manifest.tiers[0]
    head = tier.trainable_count - sum(p.a_shape[0] * (p.a_shape[1] + p.b_shape[0]) for p in tier.lora_pairs)
    return int(manifest.base_weights["parameters"]) + head
