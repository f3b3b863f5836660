"""Open one rank tier of a bundle for on-device training: the seam between export and the SDK.

Each tier ships a nominal checkpoint (parameter names and shapes, no values). Opening fills it
from the shared base weights (stored once for all tiers) and the tier's initial trainable
values, in one contiguous buffer laid out in the training graph's parameter order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from edge_sdk.embeddings import EmbeddingRows
from edge_sdk.files import sha256_file
from edge_sdk.ort_training import CheckpointState, Module, Optimizer, ort
from edge_sdk.protocol.manifest import BundleError, Manifest, Tier, read_manifest
from edge_sdk.runtime import batch_inputs


@dataclass
class OpenedTier:
    """A tier ready to train: the ORT module (training + eval graphs) and its checkpoint state."""

    root: Path
    manifest: Manifest
    tier: Tier
    state: CheckpointState
    module: Module
    embeddings: EmbeddingRows | None = None
    backend = "ort-training"

    def train_mode(self) -> None:
        self.module.train()

    def eval_mode(self) -> None:
        self.module.eval()

    def step(self, optimizer: Optimizer) -> None:
        """Apply the accumulated gradients and clear them for the next batch."""
        optimizer.step()
        self.module.lazy_reset_grad()

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite parameters by name in the checkpoint state."""
        for name, param in self.state.parameters:
            if name in values:
                param.data = np.ascontiguousarray(values[name], dtype=np.float32)

    def path(self, name: str) -> Path:
        """A file of this tier."""
        return self.root / self.tier.dir / name

    def run(
        self,
        inputs: Sequence[np.ndarray],
        labels: np.ndarray,
        proximal_mu: float = 0.0,
        anchors: Mapping[str, np.ndarray] | None = None,
        with_features: bool = False,
    ) -> list[np.ndarray]:
        """One call of the training graph (train mode: loss and gradients) or the eval graph: (loss, logits),
        and the head's input features after them `with_features` (a bundle with `Manifest.feature_width`).

        The batch's inputs are named by `runtime.batch_inputs` (token rows gathered, FedProx's μ and
        anchors for a `--proximal` bundle, by default the current values).
        """
        named = batch_inputs(self.manifest, self.tier, self.embeddings, inputs, labels, proximal_mu, anchors,
                             lambda: {n: p.data for n, p in self.state.parameters if n in self.tier.trainable})
        outputs = self.module(*(named[name] for name in self.module.input_names()))
        if with_features and self.manifest.feature_width is None:
            raise ValueError("This bundle has no features output; re-export it with this fedpeft-export.")
        return list(outputs[:3] if with_features else outputs[:2])

    def new_optimizer(self) -> Optimizer:
        """A fresh optimizer over the trainable parameters: the bundle's AdamW (zeroed moments) or SGD graph."""
        return Optimizer(str(self.path(self.tier.optimizer_model)), self.module)

    def adapter_parameters(self) -> dict[str, np.ndarray]:
        """Copies of what a device keeps and exchanges, by ONNX name: the trainable tensors and every LoRA factor.

        The LoRA factors are listed even when frozen (the shared A of a --freeze-lora-a bundle).
        """
        lora = {name for pair in self.tier.lora_pairs for name in (pair.a, pair.b)}
        return {name: np.array(param.data) for name, param in self.state.parameters
                if param.requires_grad or name in lora}


def base_weights_path(root: Path, manifest: Manifest, verify: bool = True) -> Path:
    """The frozen base weights file, checked against the manifest's SHA-256 unless `verify` is off."""
    path = root / manifest.base_weights["file"]
    if not path.is_file():
        raise BundleError(f"Bundle is incomplete: {path.name} is missing. Re-export it.")
    if verify and sha256_file(path) != manifest.base_weights["sha256"]:
        raise BundleError(f"{path} does not match the manifest's SHA-256: the bundle is corrupt. Re-export it.")
    return path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options with a fixed intra-op thread count (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def open_tier(
    bundle: str | Path,
    rank: int,
    device: str = "cpu",
    threads: int | None = None,
    verify: bool = True,
) -> OpenedTier:
    """Open tier `rank` of `bundle` with its parameters filled (base weights hashed unless `verify` is off)."""
    root = Path(bundle)
    manifest = read_manifest(root)
    tier = manifest.tier(rank)
    tier_dir = root / tier.dir
    for name in (tier.training_model, tier.eval_model, tier.optimizer_model, tier.checkpoint, tier.trainable_init):
        if not (tier_dir / name).is_file():
            raise BundleError(f"Bundle tier r={rank} is incomplete: {tier.dir}/{name} is missing. Re-export it.")
    base = base_weights_path(root, manifest, verify)
    state = CheckpointState.load_checkpoint(str(tier_dir / tier.checkpoint))
    module = Module(
        str(tier_dir / tier.training_model),
        state,
        str(tier_dir / tier.eval_model),
        device=device,
        session_options=session_options(threads),
    )
    buffer = _parameter_buffer(tier, base, tier_dir / tier.trainable_init)
    if buffer.size != module.get_parameters_size(trainable_only=False):
        raise BundleError(
            f"Tier r={rank}: the manifest describes {buffer.size} parameter values but the graph has "
            f"{module.get_parameters_size(trainable_only=False)}; the bundle is inconsistent. Re-export it."
        )
    module.copy_buffer_to_parameters(ort.OrtValue.ortvalue_from_numpy(buffer)._ortvalue, trainable_only=False)
    lookup = manifest.embedding_lookup
    embeddings = EmbeddingRows(base, lookup["table"]) if lookup else None
    return OpenedTier(root=root, manifest=manifest, tier=tier, state=state, module=module, embeddings=embeddings)


def _parameter_buffer(tier: Tier, base: Path, init: Path) -> np.ndarray:
    """All parameters in one float32 buffer in the training graph's input order.

    Tensors are read one at a time straight into the buffer, so opening holds the weights
    twice at most (this buffer and onnxruntime's copy), never three times.
    """
    with safe_open(str(base), framework="numpy") as base_file, safe_open(str(init), framework="numpy") as init_file:
        sources = [(init_file, set(init_file.keys())), (base_file, set(base_file.keys()))]
        shapes = []
        for name in tier.parameter_order:
            source = next((f for f, keys in sources if name in keys), None)
            if source is None:
                raise BundleError(
                    f"Parameter '{name}' of tier r={tier.rank} is in neither the base weights nor the tier init."
                )
            shapes.append((name, source, int(np.prod(source.get_slice(name).get_shape()))))
        buffer = np.empty(sum(size for _, _, size in shapes), dtype=np.float32)
        offset = 0
        for name, source, size in shapes:
            buffer[offset:offset + size] = source.get_tensor(name).ravel()
            offset += size
    return buffer
