"""Training through a tier's portable graph with the plain `onnxruntime` package: no training build needed.

The portable graph (`fedpeft-export`, `export/portable.py`) computes the loss and the gradients of
the trainable tensors from standard ONNX operators; the parameters live here as numpy arrays and
the optimizer step is numpy, with onnxruntime-training's update rules (AdamW in its mode 1, plain
SGD), so a tier trains the same way on either path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors import safe_open

from edge_sdk.embeddings import EmbeddingRows
from edge_sdk.files import sha256_file
from edge_sdk.protocol.manifest import BundleError, Manifest, Tier, read_manifest
from edge_sdk.runtime import batch_inputs, onnxruntime

@dataclass
class AdamW:
    """onnxruntime-training's AdamWOptimizer, mode 1 (bias correction folded into the step size, decay after)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    step_count: int = 0
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update `params` in place from `grads`."""
        self.step_count += 1
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        c1 = np.float32(1.0) - np.float32(self.beta1 ** self.step_count)
        c2 = np.float32(1.0) - np.float32(self.beta2 ** self.step_count)
        lr = np.float32(self.lr)
        corrected = lr * np.sqrt(c2) / c1
        for name, grad in grads.items():
            m, v = self.moments.setdefault(name, (np.zeros_like(grad), np.zeros_like(grad)))
            m *= b1
            m += (np.float32(1.0) - b1) * grad
            v *= b2
            v += (np.float32(1.0) - b2) * grad * grad
            param = params[name]
            param -= corrected * m / (np.sqrt(v) + np.float32(self.eps))
            if self.weight_decay:
                param -= lr * np.float32(self.weight_decay) * param


@dataclass
class Sgd:
    """Plain SGD, as the bundle's SGD optimizer graph: θ ← θ − lr·g."""

    lr: float = 1e-3

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        for name, grad in grads.items():
            params[name] -= np.float32(self.lr) * grad


class PortableTier:
    """One tier of a bundle opened for training with plain onnxruntime: its portable and eval graphs,
    every parameter as a numpy array, the gradients of the last training call."""

    backend = "portable"

    def __init__(self, bundle: str | Path, rank: int, threads: int | None = None, verify: bool = True) -> None:
        ort = onnxruntime()
        self.root = Path(bundle)
        self.manifest: Manifest = read_manifest(self.root)
        self.tier: Tier = self.manifest.tier(rank)
        if not self.tier.portable_model:
            raise BundleError(f"Bundle tier r={rank} has no portable training graph; re-export it with this "
                              "fedpeft-export to train without onnxruntime-training.")
        tier_dir = self.root / self.tier.dir
        base = self.root / self.manifest.base_weights["file"]
        if not base.is_file():
            raise BundleError(f"Bundle is incomplete: {base.name} is missing. Re-export it.")
        if verify and sha256_file(base) != self.manifest.base_weights["sha256"]:
            raise BundleError(f"{base} does not match the manifest's SHA-256: the bundle is corrupt. Re-export it.")
        self.params = _parameters(self.tier, base, tier_dir / self.tier.trainable_init)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.train_session = ort.InferenceSession(str(tier_dir / self.tier.portable_model), options, providers=providers)
        self.eval_session = ort.InferenceSession(str(tier_dir / self.tier.eval_model), options, providers=providers)
        lookup = self.manifest.embedding_lookup
        self.embeddings = EmbeddingRows(base, lookup["table"]) if lookup else None
        self.mode: Literal["train", "eval"] = "train"
        self.grads: dict[str, np.ndarray] = {}

    def run(
        self,
        inputs: Sequence[np.ndarray],
        labels: np.ndarray,
        proximal_mu: float = 0.0,
        anchors: Mapping[str, np.ndarray] | None = None,
        with_features: bool = False,
    ) -> list[np.ndarray]:
        """As `OpenedTier.run`: (loss, logits[, features]); in train mode the gradients land in `grads`."""
        named = self.named_inputs(inputs, labels, proximal_mu, anchors)
        session = self.train_session if self.mode == "train" else self.eval_session
        outputs = session.run(None, {i.name: named[i.name] for i in session.get_inputs()})
        if self.mode == "train":
            count = len(self.tier.trainable)
            self.grads = dict(zip(self.tier.trainable, outputs[-count:]))
        return list(outputs[:3] if with_features else outputs[:2])

    def named_inputs(
        self, inputs: Sequence[np.ndarray], labels: np.ndarray, proximal_mu: float = 0.0,
        anchors: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every input the graphs may take by name: the batch (`runtime.batch_inputs`) and the parameters."""
        named = dict(self.params)
        named.update(batch_inputs(self.manifest, self.tier, self.embeddings, inputs, labels, proximal_mu, anchors,
                                  lambda: {n: self.params[n] for n in self.tier.trainable}))
        return named

    def new_optimizer(self) -> AdamW | Sgd:
        """A fresh optimizer of the bundle's kind (AdamW: zero moments, step 0)."""
        return Sgd() if self.manifest.lora.optimizer == "sgd" else AdamW()

    def train_mode(self) -> None:
        self.mode = "train"

    def eval_mode(self) -> None:
        self.mode = "eval"

    def step(self, optimizer: AdamW | Sgd) -> None:
        """Apply the gradients of the last training call."""
        optimizer.step(self.params, self.grads)
        self.grads = {}

    def adapter_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable tensors and every LoRA factor (frozen ones included), by ONNX name."""
        names = set(self.tier.trainable) | {n for pair in self.tier.lora_pairs for n in (pair.a, pair.b)}
        return {name: self.params[name].copy() for name in self.tier.parameter_order if name in names}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite parameters by name (shapes must match)."""
        for name, value in values.items():
            if name in self.params:
                self.params[name][...] = value


def _parameters(tier: Tier, base: Path, init: Path) -> dict[str, np.ndarray]:
    """Every parameter of the tier's graphs by name, from the shared base weights and the tier's initial values."""
    values: dict[str, np.ndarray] = {}
    with safe_open(str(base), framework="numpy") as base_file, safe_open(str(init), framework="numpy") as init_file:
        init_names, base_names = set(init_file.keys()), set(base_file.keys())
        for name in tier.parameter_order:
            source = init_file if name in init_names else base_file if name in base_names else None
            if source is None:
                raise BundleError(f"Parameter '{name}' of tier r={tier.rank} is in neither the base weights "
                                  "nor the tier init.")
            values[name] = np.ascontiguousarray(source.get_tensor(name), dtype=np.float32)
    return values
