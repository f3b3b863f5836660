"""On-device inference with the plain onnxruntime package: a tier's inference graph with an adapter's values.

The inference graph holds the tier's initial adapter; the adapter given here replaces those
initializers when the session is made (`SessionOptions.add_initializer`), so what the device
trained or received runs without onnxruntime-training, torch or a copy of the base weights
(the graph reads them from the bundle's one safetensors file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_sdk.data import Example
from edge_sdk.encoders import encoder_for
from edge_sdk.protocol.adapter import Adapter, adapter_to_parameters
from edge_sdk.protocol.manifest import BundleError, read_manifest

LOGITS = "logits"
NOT_WITH_ADAPTERS = ["ConstantFolding"]
"""Graph optimizations that must stay off: constant folding computes from the graph's own LoRA values before the
added initializers replace them (measured: logits off by 9e-3 after 8 AdamW steps; 4e-8 with folding off, at the
same speed)."""


class Predictor:
    """Class scores for examples from `bundle`'s tier `adapter.rank` (or `rank`, with its initial adapter)."""

    def __init__(self, bundle: str | Path, adapter: Adapter | None = None, *, rank: int | None = None,
                 threads: int | None = None, batch_size: int = 32) -> None:
        self.bundle, self.manifest = Path(bundle), read_manifest(bundle)
        if self.manifest.task == "causal-lm":
            raise BundleError("Predictor scores classes; this bundle is a causal language model.")
        if adapter is None and rank is None:
            raise ValueError("Give the adapter to run, or the rank whose initial adapter to run.")
        self.threads, self.batch_size = threads, batch_size
        self.encoder = encoder_for(self.bundle, self.manifest)
        self.labels = list(self.manifest.labels)
        self.set_adapter(adapter, rank)

    def set_adapter(self, adapter: Adapter | None, rank: int | None = None) -> None:
        """Run `adapter` from now on (None: the initial adapter of tier `rank`)."""
        tier = self.manifest.tier(adapter.rank if adapter is not None else rank)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        self._values = ({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, dtype=np.float32))
                         for name, value in adapter_to_parameters(self.manifest, adapter).items()}
                        if adapter is not None else {})
        for name, value in self._values.items():
            options.add_initializer(name, value)
        self.rank = tier.rank
        self.session = ort.InferenceSession(str(self.bundle / tier.dir / tier.inference_model), options,
                                            providers=["CPUExecutionProvider"], disabled_optimizers=NOT_WITH_ADAPTERS)
        self._inputs = [i.name for i in self.session.get_inputs()]

    def logits(self, examples: Sequence[Example]) -> np.ndarray:
        """(len(examples), classes) raw scores; an example's label is not read."""
        out = [self.session.run([LOGITS], {k: v for k, v in self.encoder(examples[i:i + self.batch_size]).items()
                                           if k in self._inputs})[0]
               for i in range(0, len(examples), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def probabilities(self, examples: Sequence[Example]) -> np.ndarray:
        """Softmax of `logits`."""
        scores = self.logits(examples).astype(np.float64)
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(axis=1, keepdims=True)

    def predict(self, examples: Sequence[Example]) -> list[int]:
        """The most likely class of each example."""
        return self.logits(examples).argmax(axis=1).tolist()


def predict(bundle: str | Path, adapter: Adapter, inputs: Sequence[object]) -> list[str]:
    """The label names `adapter` predicts for raw inputs (texts, or images for an image bundle)."""
    predictor = Predictor(bundle, adapter)
    return [predictor.labels[i] for i in predictor.predict([Example(x, 0) for x in inputs])]
