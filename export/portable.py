"""Portable training graphs: a tier's loss and gradients in standard ONNX operators only.

onnxruntime-training's artifact generator writes the backward pass with operators that only
training builds register (ConcatTraining, DropoutGrad, GeluGrad, ...) and accumulates gradients in
place. `portable_training_graph` rewrites each of them as standard ONNX operators and returns the
gradients as graph outputs, so the plain `onnxruntime` package (any platform it ships for) runs a
training step; the optimizer step is numpy on the device (`edge_sdk.portable`). onnxruntime's own
graph optimizer fuses the Transpose + MatMul pairs back into its FusedMatMul kernel when it loads
the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError

MIN_OPSET = 16
"""ScatterElements with reduction (GatherGrad's lowering) needs opset 16."""

GRAD_SUFFIX = "_grad"
"""The portable graph outputs the gradient of parameter P as P + GRAD_SUFFIX."""


class _Graph:
    """New nodes and constants with names that cannot collide with the graph's own."""

    def __init__(self, ranks: dict[str, int]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.ranks = ranks
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"portable/{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type + "_node"), **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        out = self.name("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out + "_node", value=tensor))
        return out

    def rank(self, tensor: str, node: onnx.NodeProto) -> int:
        if tensor not in self.ranks:
            raise ExportError(f"Cannot make {node.op_type} '{node.name}' portable: the rank of '{tensor}' is unknown.")
        return self.ranks[tensor]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unsupported(node: onnx.NodeProto, why: str) -> ExportError:
    return ExportError(f"Cannot make {node.op_type} '{node.name}' portable: {why}.")


def _concat_training(g: _Graph, node: onnx.NodeProto) -> None:
    axis = _attrs(node).get("axis", 0)
    g.op("Concat", list(node.input), node.output[0], axis=axis)
    if len(node.output) > 1 and node.output[1]:
        end = {"end": axis + 1} if axis != -1 else {}
        lengths = [g.op("Shape", [x], start=axis, **end) for x in node.input]
        g.op("Concat", lengths, node.output[1], axis=0)


def _dropout_grad(g: _Graph, node: onnx.NodeProto) -> None:
    dy, mask = node.input[0], node.input[1]
    ratio = node.input[2] if len(node.input) > 2 and node.input[2] else g.const(0.5)
    training = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    if not training:
        g.op("Identity", [dy], node.output[0])
        return
    kept = g.op("Mul", [dy, g.op("Cast", [mask], to=TensorProto.FLOAT)])
    scale = g.op("Div", [g.const(1.0), g.op("Sub", [g.const(1.0), g.op("Cast", [ratio], to=TensorProto.FLOAT)])])
    g.op("Where", [training, g.op("Mul", [kept, scale]), dy], node.output[0])


def _gelu(g: _Graph, node: onnx.NodeProto) -> None:
    x = node.input[0]
    cdf = g.op("Mul", [g.const(0.5), g.op("Add", [g.const(1.0), g.op("Erf", [g.op("Mul", [x, g.const(math.sqrt(0.5))])])])])
    g.op("Mul", [x, cdf], node.output[0])


def _gelu_grad(g: _Graph, node: onnx.NodeProto) -> None:
    dy, x = node.input[0], node.input[1]
    cdf = g.op("Mul", [g.const(0.5), g.op("Add", [g.const(1.0), g.op("Erf", [g.op("Mul", [x, g.const(math.sqrt(0.5))])])])])
    pdf = g.op("Mul", [g.const(1.0 / math.sqrt(2.0 * math.pi)),
                       g.op("Exp", [g.op("Mul", [g.const(-0.5), g.op("Mul", [x, x])])])])
    g.op("Mul", [dy, g.op("Add", [cdf, g.op("Mul", [x, pdf])])], node.output[0])


def _tanh_grad(g: _Graph, node: onnx.NodeProto) -> None:
    dy, y = node.input[0], node.input[1]
    g.op("Mul", [dy, g.op("Sub", [g.const(1.0), g.op("Mul", [y, y])])], node.output[0])


def _softmax_grad(g: _Graph, node: onnx.NodeProto) -> None:
    dy, y = node.input[0], node.input[1]
    axes = g.const([_attrs(node).get("axis", -1)], np.int64)
    dot = g.op("ReduceSum", [g.op("Mul", [dy, y]), axes], keepdims=1)
    g.op("Mul", [y, g.op("Sub", [dy, dot])], node.output[0])


def _layer_norm_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """dx = σ⁻¹(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = dy·γ and x̂ = (x − μ)σ⁻¹; dγ, dβ summed over all but the last axis."""
    dy, x, scale, mean, inv_std = node.input[:5]
    axis = _attrs(node).get("axis", -1)
    if axis not in (-1, g.rank(x, node) - 1):
        raise _unsupported(node, f"it normalizes over axis {axis}, not the last one")
    last = g.const([-1], np.int64)
    width = g.op("Cast", [g.op("Shape", [x], start=-1)], to=TensorProto.FLOAT)
    xhat = g.op("Mul", [g.op("Sub", [x, mean]), inv_std])
    gh = g.op("Mul", [dy, scale])
    mean_g = g.op("Div", [g.op("ReduceSum", [gh, last], keepdims=1), width])
    mean_gx = g.op("Div", [g.op("ReduceSum", [g.op("Mul", [gh, xhat]), last], keepdims=1), width])
    if node.output[0]:
        g.op("Mul", [inv_std, g.op("Sub", [g.op("Sub", [gh, mean_g]), g.op("Mul", [xhat, mean_gx])])], node.output[0])
    rows = g.op("Concat", [g.const([-1], np.int64), g.op("Shape", [scale])], axis=0)
    first = g.const([0], np.int64)
    for output, value in zip(node.output[1:3], (lambda: g.op("Mul", [dy, xhat]), lambda: dy)):
        if output:
            g.op("ReduceSum", [g.op("Reshape", [value(), rows]), first], output, keepdims=0)


def _softmax_cross_entropy_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """(softmax − onehot(label)) per example, 0 for ignored labels, times dY (÷ the labels kept for 'mean')."""
    attrs = _attrs(node)
    dy, log_prob, label = node.input[:3]
    if len(node.input) > 3 and node.input[3]:
        raise _unsupported(node, "it has class weights")
    if g.rank(log_prob, node) != 2:
        raise _unsupported(node, "its scores are not (examples, classes)")
    reduction = attrs.get("reduction", b"mean").decode()
    kept = (g.op("Not", [g.op("Equal", [label, g.const(attrs["ignore_index"], np.int64)])]) if "ignore_index" in attrs
            else g.op("GreaterOrEqual", [label, g.const(0, np.int64)]))
    safe = g.op("Where", [kept, label, g.const(0, np.int64)])
    depth = g.op("Shape", [log_prob], start=1, end=2)
    onehot = g.op("OneHot", [safe, depth, g.const([0.0, 1.0])], axis=-1)
    keptf = g.op("Cast", [kept], to=TensorProto.FLOAT)
    diff = g.op("Mul", [g.op("Sub", [g.op("Exp", [log_prob]), onehot]), g.op("Unsqueeze", [keptf, g.const([1], np.int64)])])
    if reduction == "mean":
        scale = g.op("Div", [dy, g.op("ReduceSum", [keptf, g.const([0], np.int64)], keepdims=0)])
    elif reduction == "sum":
        scale = dy
    elif reduction == "none":
        scale = g.op("Unsqueeze", [dy, g.const([1], np.int64)])
    else:
        raise _unsupported(node, f"reduction {reduction!r}")
    g.op("Mul", [diff, scale], node.output[0])


def _gather_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """Zeros of the data's shape with dY added at the gathered positions (ScatterElements, reduction add)."""
    shape, indices, dy = node.input[:3]
    index_rank = g.rank(indices, node)
    if index_rank > 1:
        raise _unsupported(node, f"its indices have rank {index_rank} (0 or 1 supported)")
    rank = g.rank(dy, node) - index_rank + 1
    axis = _attrs(node).get("axis", 0) % rank
    zeros = g.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    updates = g.op("Unsqueeze", [dy, g.const([axis], np.int64)]) if index_rank == 0 else dy
    line = g.op("Reshape", [indices, g.const([1] * axis + [-1] + [1] * (rank - axis - 1), np.int64)])
    spread = g.op("Expand", [line, g.op("Shape", [updates])])
    g.op("ScatterElements", [zeros, spread, updates], node.output[0], axis=axis, reduction="add")


def _fused_matmul(g: _Graph, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise _unsupported(node, "it transposes batch dimensions")
    operands = []
    for tensor, flag in zip(node.input[:2], (attrs.get("transA", 0), attrs.get("transB", 0))):
        rank = g.rank(tensor, node)
        if flag and rank < 2:
            raise _unsupported(node, f"it transposes '{tensor}' of rank {rank}")
        operands.append(g.op("Transpose", [tensor], perm=[*range(rank - 2), rank - 1, rank - 2]) if flag else tensor)
    alpha = float(attrs.get("alpha", 1.0))
    if alpha == 1.0:
        g.op("MatMul", operands, node.output[0])
    else:
        g.op("Mul", [g.op("MatMul", operands), g.const(alpha)], node.output[0])


def _quick_gelu(g: _Graph, node: onnx.NodeProto) -> None:
    """x·σ(αx) (α = 1: SiLU, as onnxruntime fuses it)."""
    x = node.input[0]
    alpha = g.const(float(_attrs(node).get("alpha", 1.702)))
    g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, alpha])])], node.output[0])


def _quick_gelu_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """dy·σ(αx)·(1 + αx·(1 − σ(αx)))."""
    dy, x = node.input[0], node.input[1]
    ax = g.op("Mul", [x, g.const(float(_attrs(node).get("alpha", 1.702)))])
    sig = g.op("Sigmoid", [ax])
    slope = g.op("Add", [g.const(1.0), g.op("Mul", [ax, g.op("Sub", [g.const(1.0), sig])])])
    g.op("Mul", [dy, g.op("Mul", [sig, slope])], node.output[0])


def _last_axis(g: _Graph, node: onnx.NodeProto, x: str) -> None:
    axis = _attrs(node).get("axis", -1)
    if axis not in (-1, g.rank(x, node) - 1):
        raise _unsupported(node, f"it normalizes over axis {axis}, not the last one")


def _simplified_layer_norm(g: _Graph, node: onnx.NodeProto) -> None:
    """RMS normalization: y = x·σ⁻¹·γ with σ⁻¹ = 1/√(mean(x²) + ε) over the last axis, σ⁻¹ as the second output."""
    x, scale = node.input[:2]
    _last_axis(g, node, x)
    eps = g.const(float(_attrs(node).get("epsilon", 1e-5)))
    width = g.op("Cast", [g.op("Shape", [x], start=-1)], to=TensorProto.FLOAT)
    mean_sq = g.op("Div", [g.op("ReduceSum", [g.op("Mul", [x, x]), g.const([-1], np.int64)], keepdims=1), width])
    inv_std = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_sq, eps])])],
                   node.output[1] if len(node.output) > 1 and node.output[1] else None)
    g.op("Mul", [g.op("Mul", [x, inv_std]), scale], node.output[0])


def _simplified_layer_norm_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """dx = σ⁻¹(ĝ − x̂·mean(ĝ·x̂)) with ĝ = dy·γ and x̂ = x·σ⁻¹; dγ summed over all but the last axis."""
    dy, x, scale, inv_std = node.input[:4]
    _last_axis(g, node, x)
    last = g.const([-1], np.int64)
    width = g.op("Cast", [g.op("Shape", [x], start=-1)], to=TensorProto.FLOAT)
    xhat = g.op("Mul", [x, inv_std])
    gh = g.op("Mul", [dy, scale])
    mean_gx = g.op("Div", [g.op("ReduceSum", [g.op("Mul", [gh, xhat]), last], keepdims=1), width])
    if node.output[0]:
        g.op("Mul", [inv_std, g.op("Sub", [gh, g.op("Mul", [xhat, mean_gx])])], node.output[0])
    if len(node.output) > 1 and node.output[1]:
        rows = g.op("Concat", [g.const([-1], np.int64), g.op("Shape", [scale])], axis=0)
        g.op("ReduceSum", [g.op("Reshape", [g.op("Mul", [dy, xhat]), rows]), g.const([0], np.int64)], node.output[1],
             keepdims=0)


def _slice_grad(g: _Graph, node: onnx.NodeProto) -> None:
    """Zeros of the sliced tensor's shape with dY added where the slice read: the flat positions come from
    slicing an index tensor with the same starts, ends, axes and steps, so every Slice form is covered."""
    dy, shape = node.input[:2]
    size = g.op("ReduceProd", [shape], keepdims=0)
    positions = g.op("Reshape", [g.op("Range", [g.const(0, np.int64), size, g.const(1, np.int64)]), shape])
    read = g.op("Slice", [positions, *node.input[2:]])
    flat = g.const([-1], np.int64)
    zeros = g.op("ConstantOfShape", [g.op("Reshape", [size, g.const([1], np.int64)])],
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    spread = g.op("ScatterElements", [zeros, g.op("Reshape", [read, flat]), g.op("Reshape", [dy, flat])], axis=0,
                  reduction="add")
    g.op("Reshape", [spread, shape], node.output[0])


def _split_training(g: _Graph, node: onnx.NodeProto) -> None:
    """Each named output as a Slice of the input between the running sums of the split lengths."""
    x = node.input[0]
    if len(node.input) < 2 or not node.input[1]:
        raise _unsupported(node, "it has no split lengths")
    axis = g.const([_attrs(node).get("axis", 0)], np.int64)
    ends = g.op("CumSum", [node.input[1], g.const(0, np.int64)])
    starts = g.op("Sub", [ends, node.input[1]])
    for k, output in enumerate(node.output):
        if output:
            index = g.const([k], np.int64)
            g.op("Slice", [x, g.op("Gather", [starts, index], axis=0), g.op("Gather", [ends, index], axis=0), axis],
                 output)


LOWERINGS: dict[str, Callable[[_Graph, onnx.NodeProto], None]] = {
    "ConcatTraining": _concat_training,
    "DropoutGrad": _dropout_grad,
    "FusedMatMul": _fused_matmul,
    "GatherGrad": _gather_grad,
    "Gelu": _gelu,
    "GeluGrad": _gelu_grad,
    "LayerNormalizationGrad": _layer_norm_grad,
    "QuickGelu": _quick_gelu,
    "QuickGeluGrad": _quick_gelu_grad,
    "SimplifiedLayerNormalization": _simplified_layer_norm,
    "SimplifiedLayerNormalizationGrad": _simplified_layer_norm_grad,
    "SliceGrad": _slice_grad,
    "SoftmaxCrossEntropyLossGrad": _softmax_cross_entropy_grad,
    "SoftmaxGrad_13": _softmax_grad,
    "SplitTraining": _split_training,
    "TanhGrad": _tanh_grad,
}
ACCUMULATOR = "InPlaceAccumulatorV2"


def portable_training_graph(training: onnx.ModelProto, trainable: list[str]) -> onnx.ModelProto:
    """`training` (onnxruntime-training's training_model.onnx) with every training-only operator lowered to
    standard ONNX, no gradient accumulation, and the gradient of each of `trainable` as output P_grad
    after the loss and the forward outputs. Raises ExportError for an operator it cannot lower."""
    opset = next((o.version for o in training.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"Portable training graphs need opset {MIN_OPSET} or newer (this graph: {opset}); "
                          f"export with --opset {MIN_OPSET} or newer.")
    inferred = onnx.shape_inference.infer_shapes(training, strict_mode=False)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if vi.type.tensor_type.HasField("shape")}
    g = _Graph(ranks)
    grads: dict[str, str] = {}
    dropped_inputs: set[str] = set()
    accumulated: set[str] = set()
    for node in training.graph.node:
        if node.op_type == ACCUMULATOR:
            buffer, value = node.input[0], node.input[1]
            grads[buffer.removesuffix(".accumulation.buffer")] = value
            dropped_inputs.update(i for i in (buffer, *node.input[2:]) if i)
            accumulated.update(node.output)
        elif node.op_type in LOWERINGS:
            LOWERINGS[node.op_type](g, node)
        elif node.domain in ("", "ai.onnx"):
            g.nodes.append(node)
        else:
            raise _unsupported(node, f"no standard-operator form is known for {node.domain}:{node.op_type}")
    missing = [name for name in trainable if name + GRAD_SUFFIX not in grads]
    if missing:
        raise ExportError(f"The training graph has no gradient for {missing[:3]}; re-export the bundle.")
    graph = training.graph
    outputs = [o for o in graph.output if o.name not in accumulated]
    params = {i.name: i for i in graph.input}
    for name in trainable:
        dims = [d.dim_value for d in params[name].type.tensor_type.shape.dim]
        outputs.append(helper.make_tensor_value_info(grads[name + GRAD_SUFFIX], TensorProto.FLOAT, dims))
    still_used = {i for n in g.nodes for i in n.input}
    inputs = [i for i in graph.input if i.name not in dropped_inputs or i.name in still_used]
    new_graph = helper.make_graph(g.nodes, graph.name + "_portable", inputs, outputs,
                                  initializer=list(graph.initializer), value_info=[])
    model = helper.make_model(new_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fedpeft-export portable")
    model.ir_version = training.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _seeded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose Dropout nodes draw from their own fixed seeds, so two graphs sharing them drop the same units."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(n for n in copy.graph.node if n.op_type == "Dropout"):
        node.attribute.append(helper.make_attribute("seed", index + 1))
    return copy


def _exposed(training: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime-training's graph with each accumulated gradient also a graph output."""
    copy = _seeded(training)
    for node in copy.graph.node:
        if node.op_type == ACCUMULATOR:
            copy.graph.output.append(helper.make_tensor_value_info(node.input[1], TensorProto.FLOAT, None))
    return copy


def gradient_difference(bundle: Path, rank: int, inputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Largest ‖g_portable − g_ort‖ / ‖g_ort‖ over the trainable tensors of tier `rank` on one batch, both
    graphs run by onnxruntime-training's build with the same dropout masks and LoRA B set off zero (so
    that A's gradients are not trivially 0)."""
    from edge_sdk.ort_training import ort
    from edge_sdk.portable import PortableTier

    opened = PortableTier(bundle, rank)
    tier_dir = Path(bundle) / opened.tier.dir
    rng = np.random.default_rng(0)
    for pair in opened.tier.lora_pairs:
        b = opened.params[pair.b]
        opened.params[pair.b] = (0.02 * rng.standard_normal(b.shape)).astype(np.float32)
    reference = ort.InferenceSession(_exposed(onnx.load(str(tier_dir / opened.tier.training_model))).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    portable = ort.InferenceSession(_seeded(onnx.load(str(tier_dir / opened.tier.portable_model))).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    named = opened.named_inputs(inputs, labels)
    feeds = {}
    for spec in reference.get_inputs():
        if spec.name in named:
            feeds[spec.name] = named[spec.name]
        elif spec.name.endswith(".accumulation.buffer"):
            feeds[spec.name] = np.zeros_like(opened.params[spec.name.removesuffix(GRAD_SUFFIX + ".accumulation.buffer")])
        else:
            feeds[spec.name] = np.ones([d if isinstance(d, int) else 1 for d in spec.shape], dtype=bool)
    names = [o.name for o in reference.get_outputs()]
    expected = dict(zip(names, reference.run(None, feeds)))
    got = dict(zip([o.name for o in portable.get_outputs()],
                   portable.run(None, {s.name: feeds[s.name] for s in portable.get_inputs()})))
    worst = 0.0
    for name in opened.tier.trainable:
        g_ref, g = expected[name + GRAD_SUFFIX].astype(np.float64), got[name + GRAD_SUFFIX].astype(np.float64)
        scale = np.linalg.norm(g_ref)
        worst = max(worst, float(np.linalg.norm(g - g_ref) / scale) if scale > 0 else float(np.linalg.norm(g)))
    return worst
