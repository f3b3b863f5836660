"""TorchScript ONNX export of the LoRA model and the graph repairs onnxruntime-training 1.19 needs."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import onnx
import torch

from edge_sdk.protocol.manifest import FEATURES_OUTPUT
from export.errors import ExportError
from export.model import LoadedModel

OUTPUT_NAME = "logits"


def export_forward(loaded: LoadedModel, sample: list[torch.Tensor], opset: int) -> onnx.ModelProto:
    """Export the forward graph in TRAINING mode with constant folding off.

    EVAL mode de-duplicates equal initializers (zero lora_B tensors collapse into one) and folding
    turns LoRA weights into constants; both would leave LoRA untrainable.
    """
    dynamic_axes = {name: dict(enumerate(axes)) for name, _, axes in loaded.task.inputs}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"} if not loaded.task.flatten_logits else {0: "tokens"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            loaded.wrapper,
            tuple(sample),
            buffer,
            input_names=[name for name, _, _ in loaded.task.inputs],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    add_missing_optional_outputs(model)
    check_trainable_initializers(model, loaded.trainable)
    return model


def add_missing_optional_outputs(model: onnx.ModelProto) -> None:
    """Give LayerNormalization (Mean, InvStdDev) and Dropout (mask) their optional outputs.

    onnxruntime-training 1.19's gradient builder indexes those outputs and fails without them.
    """
    wanted = {"LayerNormalization": 3, "Dropout": 2}
    for index, node in enumerate(model.graph.node):
        total = wanted.get(node.op_type)
        if total is None:
            continue
        while len(node.output) < total:
            node.output.append(f"{node.name or node.op_type}_{index}_opt_out{len(node.output)}")


def add_feature_output(model: onnx.ModelProto, trainable: list[str]) -> int | None:
    """Expose the classifier head's input, before the head's dropout, as the graph output `features`.

    The head is the Gemm whose weight is a trainable initializer of shape (classes, width) or
    (width, classes). Devices sum the statistics of these features for a closed-form head. Returns
    the feature width, or None when the graph has no such head (a language model's tied output).
    """
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer if init.name in set(trainable)}
    head = next((node for node in graph.node if node.op_type == "Gemm" and node.input[1] in shapes
                 and node.output[0] == OUTPUT_NAME), None)
    if head is None:
        return None
    trans_b = next((a.i for a in head.attribute if a.name == "transB"), 0)
    width = shapes[head.input[1]][1 if trans_b else 0]
    source = head.input[0]
    producer = next((node for node in graph.node if source in node.output), None)
    if producer is not None and producer.op_type == "Dropout":
        source = producer.input[0]
    graph.node.append(onnx.helper.make_node("Identity", [source], [FEATURES_OUTPUT], name="features_output"))
    graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, ["batch", width]))
    return width


def detach_embedding_lookup(model: onnx.ModelProto, ids_input: str, frozen: set[str]) -> dict | None:
    """Make the token-embedding lookup a graph input, so devices gather rows from disk instead of holding the table.

    Finds Gather(table, ids_input) where `table` is a frozen 2-D initializer read by nothing else,
    removes it and the table from `model`, and feeds its output from a new float input
    `<ids_input>.embedded`. Returns {"table", "ids", "input"}, or None when the graph has no such
    lookup (image models; language models whose output layer reuses the table).
    """
    graph = model.graph
    tables = {init.name: init for init in graph.initializer
              if init.name in frozen and len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT}
    readers = Counter(name for node in graph.node for name in node.input)
    lookup = next((node for node in graph.node
                   if node.op_type == "Gather" and list(node.input[1:]) == [ids_input] and node.input[0] in tables
                   and readers[node.input[0]] == 1 and all(a.i == 0 for a in node.attribute if a.name == "axis")),
                  None)
    if lookup is None:
        return None
    table = tables[lookup.input[0]]
    embedded = f"{ids_input}.embedded"
    for node in graph.node:
        node.input[:] = [embedded if name == lookup.output[0] else name for name in node.input]
    graph.node.remove(lookup)
    graph.initializer.remove(table)
    graph.input.append(onnx.helper.make_tensor_value_info(
        embedded, onnx.TensorProto.FLOAT, ["batch", "sequence", int(table.dims[1])]))
    return {"table": table.name, "ids": ids_input, "input": embedded}


def check_trainable_initializers(model: onnx.ModelProto, trainable: list[str]) -> None:
    """Every trainable parameter must be a distinct initializer of the graph, not a folded constant."""
    names = {init.name for init in model.graph.initializer}
    missing = [name for name in trainable if name not in names]
    if missing:
        raise ExportError(
            f"{len(missing)} trainable parameters are not graph initializers after export "
            f"(folded or de-duplicated), e.g. {missing[:3]}."
        )


def frozen_initializers(model: onnx.ModelProto, trainable: list[str]) -> list[onnx.TensorProto]:
    """The float initializers that stay frozen: the shared base weights."""
    skip = set(trainable)
    return [
        init
        for init in model.graph.initializer
        if init.name not in skip and init.data_type == onnx.TensorProto.FLOAT
    ]
