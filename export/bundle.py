"""Write a FedPEFT bundle: per-tier onnxruntime-training artifacts over base weights stored once."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

from edge_sdk.bundle import OpenedTier, open_tier
from edge_sdk.embeddings import safetensors_header
from edge_sdk.files import sha256_file
from edge_sdk.protocol.manifest import (
    FEATURES_OUTPUT, FORMAT, FORMAT_VERSION, MANIFEST_FILE, LoraPair, LoraSettings, Manifest, OptimizerName, SvdInit, TensorSpec, Tier,
)
from export import __version__
from export.errors import ExportError
from export.portable import gradient_difference, portable_training_graph
from export.graph import (
    OUTPUT_NAME,
    add_feature_output,
    detach_embedding_lookup,
    export_forward,
    frozen_initializers,
)
from export.model import (
    DEFAULT_MODEL_ID, SHARED_A_SEED, TASKS, WEIGHT_SUFFIXES, LoadedModel, load_lora_model, resolve_model_dir,
    sample_inputs,
)

BASE_WEIGHTS_FILE = "base_weights.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKEN_IDS = "input_ids"
PRINCIPAL_FILE = "svd_init.safetensors"
PARITY_TOLERANCE = 1e-4
"""Largest |logit| gap of the ORT graphs from the peft model, relative to the largest |logit| (at least 1): a
language model's logits reach ~20 over a 49k vocabulary, and float32 over 30 layers differs by ~1e-5 of that."""
PORTABLE_TOLERANCE = 1e-4
"""Largest relative gradient gap of a portable graph from onnxruntime-training's (measured: ~1e-6)."""
PORTABLE_MODEL = "portable_model.onnx"
log = logging.getLogger("fedpeft.export")
MAX_IR_VERSION = 10
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ExportOptions:
    """What to export; mirrors the `fedpeft-export` options."""

    model: str | None = None
    model_id: str | None = None
    """The base model's hub id, recorded for peft folders to load it by (default: the default model's id,
    else the model folder's name)."""
    task: str = "seq-cls"
    num_labels: int | None = 2
    labels: tuple[str, ...] | None = None
    """The task's class names in label order (as many as num_labels); they name the classes in the manifest
    and in every peft folder (default: the base config's id2label, LABEL_0, LABEL_1, ...)."""
    target_modules: tuple[str, ...] | str | None = None
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    alpha: float = 16.0
    scaling: float | None = None
    """Every tier's LoRA scaling (lora_alpha = scaling × r); None: alpha / r, peft's default."""
    train_head: bool = True
    max_seq_len: int = 128
    opset: int = 17
    freeze_lora_a: bool = False
    svd_init: bool = False
    full_finetune: bool = False
    optimizer: OptimizerName = "adamw"
    proximal: bool = False


OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)


def export_bundle(
    out: str | Path,
    options: ExportOptions,
    force: bool = False,
    on_tier: Callable[[int], None] | None = None,
) -> Manifest:
    """Export `options.model` to the bundle folder `out`, atomically; `on_tier(rank)` reports progress."""
    out = Path(out).resolve()
    _check_options(options)
    if out.exists() and not force:
        raise ExportError(f"'{out}' already exists; pass --force to replace it.")
    model_dir = resolve_model_dir(options.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write_bundle(work, model_dir, options, on_tier)
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _check_options(options: ExportOptions) -> None:
    if options.task not in TASKS:
        raise ExportError(f"Unsupported task '{options.task}'; choose one of {', '.join(TASKS)}.")
    if not options.ranks:
        raise ExportError("At least one rank tier is needed (--ranks 2,4,8,16).")
    bad = [r for r in options.ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
    if bad:
        raise ExportError(f"Ranks must be positive integers; got {bad}.")
    if options.task == "causal-lm" and options.train_head:
        raise ExportError("causal-lm trains LoRA only: the LM head is tied to the embeddings. Pass --no-train-head.")
    if options.scaling is not None and not (math.isfinite(options.scaling) and options.scaling > 0):
        raise ExportError(f"--scaling must be a positive number, got {options.scaling}.")
    if options.max_seq_len <= 0:
        raise ExportError("--max-seq-len must be positive.")
    if options.svd_init and options.freeze_lora_a:
        raise ExportError("--svd-init and --freeze-lora-a both set LoRA A; choose one.")
    if options.full_finetune and (options.svd_init or options.freeze_lora_a):
        raise ExportError("--full-finetune trains the weights themselves; it takes no LoRA init option.")
    if options.optimizer not in OPTIMIZERS:
        raise ExportError(f"Unknown optimizer '{options.optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
    if options.labels is not None:
        _check_labels(options)


def _check_labels(options: ExportOptions) -> None:
    names = options.labels or ()
    if options.task == "causal-lm":
        raise ExportError("causal-lm predicts tokens and has no class names; drop --labels.")
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
        raise ExportError(f"--labels must be distinct non-empty names, got {list(names)}.")
    if options.num_labels is not None and options.num_labels != len(names):
        raise ExportError(f"--labels names {len(names)} classes but --num-labels is {options.num_labels}; "
                          "give one of them, or make them agree.")


def _replace(work: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is removed only after the new one is in."""
    if not out.exists():
        os.replace(work, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "bundle")
    try:
        os.replace(work, out)
    except OSError:
        os.replace(old / "bundle", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Exported:
    """What exporting the tiers yields: the tiers, the first tier's loaded model, its frozen base and the
    PyTorch reference (inputs, logits) each tier is verified against."""

    tiers: list[Tier]
    first: LoadedModel
    base: dict[str, np.ndarray]
    lookup: dict | None
    references: dict[int, tuple[list[np.ndarray], np.ndarray]]
    feature_width: int | None


def _write_bundle(
    work: Path, model_dir: Path, options: ExportOptions, on_tier: Callable[[int], None] | None
) -> Manifest:
    ort.set_default_logger_severity(3)
    exported = _export_tiers(work, model_dir, options, on_tier)
    tokenizer = _write_tokenizer(work, model_dir, options.task)
    svd_init = _write_principal(work, exported.first, min(options.ranks)) if options.svd_init else None
    manifest = _manifest(work, model_dir, options, exported, tokenizer, svd_init)
    (work / MANIFEST_FILE).write_text(manifest.to_json())
    checked = [_verify_portable(work, replace(t, parity_max_abs_diff=_verify_tier(work, t, *exported.references[t.rank])),
                                exported.references[t.rank][0], manifest.label_input.axes == ["tokens"])
               for t in exported.tiers]
    manifest = replace(manifest, tiers=checked)
    (work / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def _export_tiers(
    work: Path, model_dir: Path, options: ExportOptions, on_tier: Callable[[int], None] | None
) -> _Exported:
    """Export every tier's graphs; the first tier writes the base weights, the others must match them."""
    exported: _Exported | None = None
    for rank in sorted(set(options.ranks)):
        loaded = load_lora_model(
            model_dir, options.task, rank, options.alpha if options.scaling is None else options.scaling * rank,
            list(options.target_modules) if isinstance(options.target_modules, tuple) else options.target_modules,
            options.train_head, options.num_labels,
            shared_a_rank=max(options.ranks) if options.freeze_lora_a else None,
            svd_prefix=min(options.ranks) if options.svd_init else None,
            train_all=options.full_finetune,
        )
        sample = sample_inputs(loaded.task, loaded.config)
        graph = export_forward(loaded, sample, options.opset)
        width = add_feature_output(graph, loaded.trainable) if options.train_head else None
        frozen_inits = frozen_initializers(graph, loaded.trainable + loaded.frozen_lora)
        frozen = {init.name: numpy_helper.to_array(init) for init in frozen_inits}
        if exported is None:
            save_file(frozen, str(work / BASE_WEIGHTS_FILE))
        else:
            _check_same_base(exported.base, frozen, rank)
        training = onnx.ModelProto()
        training.CopyFrom(graph)
        lookup = detach_embedding_lookup(training, TOKEN_IDS, set(frozen))
        tier = _write_tier(work, rank, loaded, graph, training, list(frozen), options.optimizer, options.proximal)
        if exported is None:
            exported = _Exported([], loaded, frozen, lookup, {}, width)
        exported.tiers.append(tier)
        with torch.no_grad():
            exported.references[rank] = ([t.numpy() for t in sample], loaded.wrapper(*sample).numpy())
        if on_tier is not None:
            on_tier(rank)
    assert exported is not None
    return exported


def _manifest(work: Path, model_dir: Path, options: ExportOptions, exported: _Exported, tokenizer: dict,
              svd_init: SvdInit | None) -> Manifest:
    first = exported.first
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        created_by=f"fedpeft-export {__version__}",
        base_model=_describe_base(model_dir, first.config,
                                  options.model_id or (DEFAULT_MODEL_ID if options.model is None else model_dir.name)),
        task=options.task,
        inputs=[TensorSpec(name, dtype, list(axes)) for name, dtype, axes in first.task.inputs],
        outputs=[TensorSpec(OUTPUT_NAME, "float32", ["tokens" if first.task.flatten_logits else "batch", "classes"])]
        + ([TensorSpec(FEATURES_OUTPUT, "float32", ["batch", "features"])] if exported.feature_width else []),
        label_input=TensorSpec("labels", "int64", list(first.task.label_shape)),
        labels=list(options.labels) if options.labels else _labels(first.config, options.task),
        max_seq_len=options.max_seq_len,
        opset=options.opset,
        lora=LoraSettings(
            target_modules=first.target_modules, alpha=options.alpha, scaling=options.scaling, dropout=0.0,
            train_head=options.train_head,
            ignore_index=IGNORE_INDEX, frozen_a_seed=SHARED_A_SEED if options.freeze_lora_a else None,
            svd_init=svd_init, full_finetune=options.full_finetune, optimizer=options.optimizer,
            proximal=options.proximal,
        ),
        base_weights={
            "file": BASE_WEIGHTS_FILE,
            "sha256": sha256_file(work / BASE_WEIGHTS_FILE),
            "tensors": len(exported.base),
            "parameters": int(sum(v.size for v in exported.base.values())),
        },
        tokenizer=tokenizer,
        peft_keys=first.peft_keys,
        peft_config=first.peft_config,
        head_shapes={n: s for n, s in first.trainable_shapes.items() if "lora_" not in n},
        tiers=exported.tiers,
        embedding_lookup=exported.lookup,
    )


def _write_principal(work: Path, loaded: LoadedModel, prefix: int) -> SvdInit:
    """Save the principal parts moved out of the base by --svd-init, so adapters convert back to the original base.

    Column slices are strided; safetensors.numpy writes a strided array's memory, not its values.
    """
    tensors = {f"{layer}.{part}": np.ascontiguousarray(value.numpy()) for layer, parts in loaded.principal.items()
               for part, value in parts.items()}
    save_file(tensors, str(work / PRINCIPAL_FILE))
    return SvdInit(method="federa", prefix_rank=prefix, file=PRINCIPAL_FILE, sha256=sha256_file(work / PRINCIPAL_FILE))


def _check_same_base(base: dict[str, np.ndarray], frozen: dict[str, np.ndarray], rank: int) -> None:
    if base.keys() != frozen.keys() or any(not np.array_equal(base[k], frozen[k]) for k in base):
        raise ExportError(f"Tier r={rank} exported different frozen base weights than the first tier.")


def _write_tier(work: Path, rank: int, loaded: LoadedModel, graph: onnx.ModelProto, training: onnx.ModelProto,
                frozen_names: list[str], optimizer: str, proximal: bool) -> Tier:
    """Generate the training/eval/optimizer (AdamW or SGD) graphs, nominal checkpoint, initial values and inference graph.

    The training and eval graphs come from `training` (the forward graph less the embedding lookup
    where there is one), the inference graph from the whole forward `graph`.

    With `proximal` the loss carries FedProx's term, its μ and anchors as extra graph inputs.

    LoRA factors frozen by --freeze-lora-a are stored with the tier's initial values (they differ per
    tier), not with the shared base weights.
    """
    from onnxruntime.training import artifacts, onnxblock

    from export.loss import ProximalCrossEntropy

    tier_dir = work / "tiers" / f"r{rank}"
    tier_dir.mkdir(parents=True)
    trainable = loaded.trainable
    inits = {init.name: init for init in graph.graph.initializer}
    loss = (ProximalCrossEntropy({n: list(inits[n].dims) for n in trainable}, IGNORE_INDEX) if proximal
            else onnxblock.loss.CrossEntropyLoss(ignore_index=IGNORE_INDEX))
    save_file({n: numpy_helper.to_array(inits[n]) for n in trainable + loaded.frozen_lora},
              str(tier_dir / "trainable_init.safetensors"))
    present = {init.name for init in training.graph.initializer}
    with _native_stderr_captured(f"generating training artifacts for r={rank}"):
        artifacts.generate_artifacts(
            training,
            requires_grad=trainable,
            frozen_params=[name for name in frozen_names if name in present] + loaded.frozen_lora,
            loss=loss,
            optimizer=artifacts.OptimType.SGD if optimizer == "sgd" else artifacts.OptimType.AdamW,
            artifact_directory=tier_dir,
            additional_output_names=[o.name for o in graph.graph.output],
            loss_input_names=[OUTPUT_NAME],
            nominal_checkpoint=True,
        )
    (tier_dir / "checkpoint").unlink()
    _cap_ir_version(tier_dir / "optimizer_model.onnx")
    written = onnx.load(str(tier_dir / "training_model.onnx"))
    try:
        onnx.save(portable_training_graph(written, trainable), str(tier_dir / PORTABLE_MODEL))
        portable: str | None = PORTABLE_MODEL
    except ExportError as err:
        log.warning("Tier r=%d gets no portable training graph (devices need onnxruntime-training): %s", rank, err)
        portable = None
    params = set(trainable) | set(frozen_names) | set(loaded.frozen_lora)
    order = [i.name for i in written.graph.input if i.name in params]
    _write_inference_graph(graph, tier_dir / "inference_model.onnx", frozen_names, work / BASE_WEIGHTS_FILE)
    return Tier(
        rank=rank,
        dir=f"tiers/r{rank}",
        training_model="training_model.onnx",
        eval_model="eval_model.onnx",
        optimizer_model="optimizer_model.onnx",
        checkpoint="nominal_checkpoint",
        trainable_init="trainable_init.safetensors",
        inference_model="inference_model.onnx",
        parameter_order=order,
        trainable=trainable,
        trainable_count=int(sum(int(np.prod(inits[n].dims)) for n in trainable)),
        lora_pairs=[LoraPair(**p) for p in loaded.lora_pairs],
        parity_max_abs_diff=None,
        portable_model=portable,
    )


@contextlib.contextmanager
def _native_stderr_captured(what: str) -> Iterator[None]:
    """Hold back onnxruntime's native INFO log (the graph builder ignores the Python log level).

    The captured text is shown only when the step fails.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception as err:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read()[-4000:].decode(errors="replace")
            raise ExportError(f"onnxruntime failed while {what}: {err}\n{tail}") from err
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cap_ir_version(path: Path) -> None:
    """onnx ≥ 1.18 stamps IR version 11+, which onnxruntime 1.19 refuses; the graphs need nothing newer."""
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))


def _write_inference_graph(graph: onnx.ModelProto, path: Path, frozen: list[str], weights: Path) -> None:
    """Forward-only graph (dropout off) whose frozen initializers point into the shared safetensors file.

    safetensors stores raw little-endian row-major tensors after a JSON header, which is exactly
    ONNX's external-data layout, so the base weights serve inference without a second copy.
    """
    header, data_start = safetensors_header(weights)
    location = os.path.relpath(weights, path.parent)
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    for node in model.graph.node:
        if node.op_type == "Dropout":
            del node.input[2:]
    frozen_set = set(frozen)
    for init in model.graph.initializer:
        if init.name not in frozen_set:
            continue
        begin, end = header[init.name]["data_offsets"]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", location), ("offset", str(data_start + begin)), ("length", str(end - begin))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _verify_tier(work: Path, tier: Tier, feeds: list[np.ndarray], reference: np.ndarray) -> float:
    """Open the written tier as a device would; check the trainable set and logits against peft.

    Returns the largest absolute logit difference over the eval and inference graphs.
    """
    opened = open_tier(work, tier.rank)
    trainable = {name for name, param in opened.state.parameters if param.requires_grad}
    if trainable != set(tier.trainable):
        raise ExportError(
            f"Tier r={tier.rank}: trainable set differs from LoRA(+head): "
            f"extra {sorted(trainable - set(tier.trainable))[:3]}, missing {sorted(set(tier.trainable) - trainable)[:3]}."
        )
    labels = np.zeros(reference.shape[0], dtype=np.int64)
    opened.module.eval()
    _, eval_logits, *features = opened.run(feeds, labels, with_features=opened.manifest.feature_width is not None)
    if features:
        _check_features(opened, features[0], eval_logits)
    inference = ort.InferenceSession(str(work / tier.dir / tier.inference_model), providers=["CPUExecutionProvider"])
    names = [spec.name for spec in opened.manifest.inputs]
    (inference_logits,) = inference.run([OUTPUT_NAME], dict(zip(names, feeds)))
    diffs = {
        "eval": float(np.max(np.abs(eval_logits - reference))),
        "inference": float(np.max(np.abs(inference_logits - reference))),
    }
    scale = max(1.0, float(np.max(np.abs(reference))))
    for graph, diff in diffs.items():
        if not diff <= PARITY_TOLERANCE * scale:
            raise ExportError(f"Tier r={tier.rank}: ORT {graph} logits differ from the peft model by {diff:.2e} "
                              f"(> {PARITY_TOLERANCE} × the largest |logit| {scale:.3g}).")
    return max(diffs.values())


def _verify_portable(work: Path, tier: Tier, feeds: list[np.ndarray], per_token: bool) -> Tier:
    """`tier` with its portable graph's largest relative gradient gap from onnxruntime-training's on the
    sample batch (`per_token`: each position labelled with its own token), or without a portable graph (removed,
    with a warning) where the gap exceeds the tolerance."""
    if tier.portable_model is None:
        return tier
    if per_token:
        labels = feeds[0].reshape(-1).astype(np.int64)
    else:
        labels = np.zeros(feeds[0].shape[0], dtype=np.int64)
    gap = gradient_difference(work, tier.rank, feeds, labels)
    if gap <= PORTABLE_TOLERANCE:
        return replace(tier, portable_max_rel_diff=gap)
    log.warning("Tier r=%d gets no portable training graph (devices need onnxruntime-training): its gradients "
                "differ from onnxruntime-training's by %.2e (relative, > %g).", tier.rank, gap, PORTABLE_TOLERANCE)
    (work / tier.dir / tier.portable_model).unlink()
    return replace(tier, portable_model=None)


def _check_features(opened: OpenedTier, features: np.ndarray, logits: np.ndarray) -> None:
    """The `features` output must be what the output layer reads: logits = features · Wᵀ + b (dropout off)."""
    manifest = opened.manifest
    values = opened.adapter_parameters()
    weight = values[manifest.output_weight]
    bias = values[manifest.output_bias] if manifest.output_bias else 0.0
    diff = float(np.max(np.abs(features @ weight.T + bias - logits)))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"Tier r={opened.tier.rank}: the features output does not feed the head "
                          f"(logits differ by {diff:.2e}); export with --no-train-head or report the model.")


def _write_tokenizer(work: Path, model_dir: Path, task: str) -> dict:
    """Save tokenizer.json (fast tokenizer) for text tasks so devices tokenize with `tokenizers` alone."""
    if task == "img-cls":
        preprocessor = model_dir / "preprocessor_config.json"
        if preprocessor.is_file():
            shutil.copy2(preprocessor, work / "preprocessor_config.json")
            return {"preprocessor": "preprocessor_config.json"}
        return {}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ExportError(f"No usable tokenizer in '{model_dir}': {err}") from err
    if not tokenizer.is_fast:
        raise ExportError(f"The tokenizer of '{model_dir}' has no fast (tokenizer.json) form for devices.")
    target = work / TOKENIZER_DIR
    tokenizer.save_pretrained(str(target))
    return {
        "dir": TOKENIZER_DIR,
        "file": f"{TOKENIZER_DIR}/tokenizer.json",
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "files": sorted(p.name for p in target.iterdir()),
    }


def _describe_base(model_dir: Path, config: dict, model_id: str) -> dict:
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {
        "name": config.get("_name_or_path") or model_dir.name,
        "id": model_id,
        "path": str(model_dir),
        "model_type": config.get("model_type"),
        "weights_sha256": {p.name: sha256_file(p) for p in weights},
        "random_init": not weights,
        "config": {k: config[k] for k in ("vocab_size", "image_size", "num_channels", "hidden_size") if k in config},
    }


def _labels(config: dict, task: str) -> list[str]:
    if task == "causal-lm":
        return []
    id2label = config.get("id2label") or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
