"""Traffic of the communication reference, full-model FedAvg: every client downloads and uploads all model weights."""

from __future__ import annotations

import math

BYTES_PER_FLOAT32 = 4


def full_fedavg_upload_bytes(total_parameters: int, clients: int, bytes_per_value: int = BYTES_PER_FLOAT32) -> int:
    """Bytes `clients` upload in one round of full-model FedAvg (the download is as large)."""
    return clients * total_parameters * bytes_per_value


def full_fedavg_round_bytes(total_parameters: int, clients: int, bytes_per_value: int = BYTES_PER_FLOAT32) -> int:
    """Bytes one round moves (down + up) when `clients` exchange the whole model."""
    return 2 * full_fedavg_upload_bytes(total_parameters, clients, bytes_per_value)


def model_parameters(manifest) -> int:
    """Base + head parameters of a bundle (`edge_sdk.protocol.manifest.Manifest`): what full fine-tuning sends."""
    head = sum(math.prod(shape) for shape in manifest.head_shapes.values())
    return int(manifest.base_weights["parameters"]) + head
