"""The training loss written into a tier's graphs: cross-entropy, optionally with FedProx's proximal term."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.training import onnxblock
from onnxruntime.training.onnxblock import _graph_utils, blocks

from edge_sdk.protocol.manifest import PROXIMAL_MU_INPUT, anchor_input


class ProximalCrossEntropy(onnxblock.Block):
    """Cross-entropy + (μ/2)·Σ_θ ‖θ − θ_anchor‖² over the trainable tensors (FedProx's local objective).

    μ and one anchor per trainable tensor are graph inputs, so a device feeds the global adapter it
    started the round from, and μ = 0 gives plain cross-entropy from the same graphs.
    """

    def __init__(self, trainable: Mapping[str, Sequence[int]], ignore_index: int) -> None:
        super().__init__()
        self._cross_entropy = onnxblock.loss.CrossEntropyLoss(ignore_index=ignore_index)
        self._trainable = dict(trainable)

    def build(self, scores_input_name: str, labels_name: str = "labels") -> str:
        loss = self._cross_entropy(scores_input_name, labels_name)
        graph = self.base.graph
        graph.input.append(onnx.helper.make_tensor_value_info(PROXIMAL_MU_INPUT, onnx.TensorProto.FLOAT, []))
        total = None
        for name, dims in self._trainable.items():
            anchor = anchor_input(name)
            graph.input.append(onnx.helper.make_tensor_value_info(anchor, onnx.TensorProto.FLOAT, list(dims)))
            diff = blocks.Sub()(name, anchor)
            squares = blocks.ReduceSum(keepdims=False)(blocks.Mul()(diff, diff))
            total = squares if total is None else blocks.Add()(total, squares)
        half = _graph_utils.generate_graph_name("proximal.half")
        graph.initializer.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), half))
        return blocks.Add()(loss, blocks.Mul()(blocks.Mul()(half, PROXIMAL_MU_INPUT), total))
