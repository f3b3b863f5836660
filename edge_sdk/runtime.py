"""Which onnxruntime this device has, and opening a tier for training on the path it supports.

Two paths train a tier: onnxruntime-training's on-device API (`edge_sdk.bundle`, x86_64 builds of
1.19.2 only) and the portable graph with the plain `onnxruntime` package on any platform it ships
for (`edge_sdk.portable`). Both give the same gradients (`fedpeft-export` checks them) and update
rules; `Backend` "auto" takes the training build where it is importable.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol

import numpy as np

from edge_sdk.embeddings import EmbeddingRows
from edge_sdk.protocol.manifest import PROXIMAL_MU_INPUT, Manifest, Tier, anchor_input

Backend = Literal["auto", "ort-training", "portable"]
ResolvedBackend = Literal["ort-training", "portable"]


def training_build_installed() -> bool:
    """Whether the installed onnxruntime is the training build (its on-device API is on disk)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "training" / "api" / "module.py").is_file()


if training_build_installed():
    # Before anything else imports onnxruntime: the training build's own import would probe for torch.
    import edge_sdk.ort_training  # noqa: F401


def onnxruntime() -> ModuleType:
    """The onnxruntime module, imported without the training build's torch probes where that build is installed."""
    if training_build_installed():
        from edge_sdk.ort_training import ort
        return ort
    return importlib.import_module("onnxruntime")


def resolve_backend(backend: Backend) -> ResolvedBackend:
    """The path `backend` means on this device: "auto" is onnxruntime-training where installed, else portable."""
    if backend not in ("auto", "ort-training", "portable"):
        raise ValueError(f"backend must be 'auto', 'ort-training' or 'portable', got {backend!r}.")
    if backend == "auto":
        return "ort-training" if training_build_installed() else "portable"
    if backend == "ort-training" and not training_build_installed():
        raise ImportError("backend 'ort-training' needs onnxruntime-training-cpu==1.19.2 (x86_64); this device "
                          "has plain onnxruntime: use backend 'portable' (or 'auto').")
    return backend


def batch_inputs(
    manifest: Manifest, tier: Tier, embeddings: EmbeddingRows | None, inputs: Sequence[np.ndarray], labels: np.ndarray,
    proximal_mu: float, anchors: Mapping[str, np.ndarray] | None, current: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """A batch's graph inputs by name: `inputs` in the manifest's order, the labels, the token rows gathered
    where the bundle has an embedding lookup, and for a `--proximal` bundle FedProx's μ and the anchors
    θ_anchor, one per trainable tensor (default: `current()` values, so the term is 0)."""
    if proximal_mu and not manifest.lora.proximal:
        raise ValueError("proximal_mu needs a bundle exported with `fedpeft-export --proximal`.")
    named = {spec.name: x for spec, x in zip(manifest.inputs, inputs)}
    named[manifest.label_input.name] = labels
    lookup = manifest.embedding_lookup
    if lookup and embeddings is not None:
        named[lookup["input"]] = embeddings(named[lookup["ids"]])
    if manifest.lora.proximal:
        anchors = anchors if anchors is not None else current()
        named[PROXIMAL_MU_INPUT] = np.array(proximal_mu, dtype=np.float32)
        named.update((anchor_input(name), anchors[name]) for name in tier.trainable)
    return named


class Optimizer(Protocol):
    def set_learning_rate(self, learning_rate: float) -> None: ...


class TrainingTier(Protocol):
    """What the Trainer needs of an opened tier, on either path."""

    manifest: Manifest
    tier: Tier
    backend: ResolvedBackend

    def run(self, inputs: Sequence[np.ndarray], labels: np.ndarray, proximal_mu: float = 0.0,
            anchors: Mapping[str, np.ndarray] | None = None, with_features: bool = False) -> list[np.ndarray]: ...

    def train_mode(self) -> None: ...

    def eval_mode(self) -> None: ...

    def new_optimizer(self) -> Optimizer: ...

    def step(self, optimizer: Optimizer) -> None: ...

    def adapter_parameters(self) -> dict[str, np.ndarray]: ...

    def write(self, values: Mapping[str, np.ndarray]) -> None: ...


def open_training(bundle: str | Path, rank: int, *, backend: Backend = "auto", device: str = "cpu",
                  threads: int | None = None, verify: bool = True) -> TrainingTier:
    """Tier `rank` of `bundle` opened for training on `backend`."""
    if resolve_backend(backend) == "ort-training":
        from edge_sdk.bundle import open_tier
        return open_tier(bundle, rank, device=device, threads=threads, verify=verify)
    from edge_sdk.portable import PortableTier
    if device != "cpu":
        raise ValueError(f"The portable path trains on the CPU; device {device!r} needs onnxruntime-training.")
    return PortableTier(bundle, rank, threads=threads, verify=verify)
