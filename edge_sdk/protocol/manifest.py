"""The bundle manifest: the one description of a bundle that export writes and the SDK and aggregator read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

FORMAT = "fedpeft-bundle"
FORMAT_VERSION = 2
"""Version 2 added `embedding_lookup`; version 1 bundles (no lookup) are still read."""
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
PROXIMAL_MU_INPUT = "proximal_mu"
FEATURES_OUTPUT = "features"
"""Graph output of a classification bundle's head input (per example); see `Manifest.feature_width`."""
"""Graph input of a `--proximal` bundle: FedProx's μ, a float32 scalar (0 turns the term off)."""


def anchor_input(parameter: str) -> str:
    """Graph input of a `--proximal` bundle holding the round's starting value of `parameter`."""
    return f"{parameter}.anchor"


class BundleError(Exception):
    """A bundle is missing, incomplete or of an unsupported format."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type and named (dynamic) axes."""

    name: str
    dtype: str
    axes: list[str]


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-wrapped layer: ΔW = scaling · B @ A with A (r × in) and B (out × r)."""

    layer: str
    a: str
    b: str
    a_shape: list[int]
    b_shape: list[int]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a_shape[0]


OptimizerName = Literal["adamw", "sgd"]
"""The optimizer graph of every tier (`fedpeft-export --optimizer`)."""


@dataclass(frozen=True)
class SvdInit:
    """`--svd-init` (FeDeRA): the principal part of each adapted weight moved from the base into the adapters.

    `file` (with its SHA-256) holds that part, so adapters convert back onto the original weights.
    """

    method: str
    prefix_rank: int
    file: str
    sha256: str


@dataclass(frozen=True)
class LoraSettings:
    """How the bundle's LoRA was set up; fields added after the first bundles have their old behaviour as default."""

    target_modules: list[str] | str
    alpha: float
    dropout: float = 0.0
    train_head: bool = True
    ignore_index: int = -100
    scaling: float | None = None
    """One LoRA scaling for every tier (`fedpeft-export --scaling`); None: alpha / r per tier."""
    frozen_a_seed: int | None = None
    """Every A frozen at one seeded draw (`--freeze-lora-a`, for ffa-lora); None: A trains."""
    svd_init: SvdInit | None = None
    full_finetune: bool = False
    """Every model weight trains (`--full-finetune`, for full-model FedAvg); the LoRA factors stay frozen."""
    optimizer: OptimizerName = "adamw"
    proximal: bool = False
    """The training graphs add FedProx's (μ/2)·Σ‖θ − θ_anchor‖² (`fedpeft-export --proximal`)."""

    @classmethod
    def from_dict(cls, data: dict) -> LoraSettings:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise BundleError(f"Malformed bundle manifest: unknown LoRA settings {sorted(unknown)}; "
                              "the bundle is newer than this SDK.")
        init = data.get("svd_init")
        return cls(**{**data, "svd_init": SvdInit(**init) if init else None})


@dataclass(frozen=True)
class Tier:
    """The graphs, checkpoint and parameter layout of one LoRA rank."""

    rank: int
    dir: str
    training_model: str
    eval_model: str
    optimizer_model: str
    checkpoint: str
    trainable_init: str
    inference_model: str
    parameter_order: list[str]
    trainable: list[str]
    trainable_count: int
    lora_pairs: list[LoraPair]
    parity_max_abs_diff: float | None
    portable_model: str | None = None
    """The loss-and-gradients graph in standard ONNX operators (`export/portable.py`), for devices without
    onnxruntime-training; None in bundles exported before it existed."""
    portable_max_rel_diff: float | None = None
    """The largest relative difference of its gradients from onnxruntime-training's, measured at export."""

    @classmethod
    def from_dict(cls, data: dict) -> Tier:
        return cls(**{**data, "lora_pairs": [LoraPair(**p) for p in data["lora_pairs"]]})


@dataclass(frozen=True)
class Manifest:
    """Everything a device or the aggregator needs to know about a bundle."""

    format: str
    format_version: int
    created_by: str
    base_model: dict
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    label_input: TensorSpec
    labels: list[str]
    max_seq_len: int
    opset: int
    lora: LoraSettings
    base_weights: dict
    tokenizer: dict
    peft_keys: dict[str, str]
    peft_config: dict
    head_shapes: dict[str, list[int]]
    tiers: list[Tier] = field(default_factory=list)
    embedding_lookup: dict | None = None
    """The token-embedding lookup the device does before each graph call, outside the graphs:
    {"table": base-weights tensor, "ids": the input whose rows it gathers, "input": the graph input
    it feeds}. The table is never loaded whole (see `edge_sdk.embeddings`). None: the graphs gather."""

    @property
    def ranks(self) -> list[int]:
        return [t.rank for t in self.tiers]

    @property
    def lora_pairs(self) -> list[LoraPair]:
        """The adapted layers (shapes at the smallest tier; in/out features are the same at every tier)."""
        return self.tiers[0].lora_pairs

    @property
    def head_parameters(self) -> list[str]:
        """Trainable parameters that are not LoRA factors: the task head (empty when it is frozen)."""
        return list(self.head_shapes)

    @property
    def output_bias(self) -> str | None:
        """The trainable bias of the classifier's output (one value per label), if the head has one."""
        found = [n for n, shape in self.head_shapes.items() if n.endswith("bias") and shape == [len(self.labels)]]
        return found[-1] if found else None

    @property
    def output_weight(self) -> str | None:
        """The trainable (labels × width) weight of the classifier's output layer, if the head has one."""
        found = [n for n, shape in self.head_shapes.items()
                 if n.endswith("weight") and len(shape) == 2 and shape[0] == len(self.labels)]
        return found[-1] if found else None

    @property
    def feature_width(self) -> int | None:
        """Width of the graphs' `features` output (the output layer's input, which closed-form heads are
        computed from); None when the bundle has no such output (exported before it, or no trainable head)."""
        if self.output_weight is None or all(o.name != FEATURES_OUTPUT for o in self.outputs):
            return None
        return self.head_shapes[self.output_weight][1]

    def tier(self, rank: int) -> Tier:
        """The tier of exactly this rank."""
        for tier in self.tiers:
            if tier.rank == rank:
                return tier
        raise BundleError(f"This bundle has no tier r={rank}; its tiers are {self.ranks}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("format") != FORMAT:
            raise BundleError(f"Not a FedPEFT bundle manifest (format={data.get('format')!r}).")
        if data.get("format_version") not in READABLE_VERSIONS:
            raise BundleError(
                f"Bundle format version {data.get('format_version')} is not supported by this SDK "
                f"(it reads versions {list(READABLE_VERSIONS)}); re-export the bundle with a matching fedpeft-export."
            )
        try:
            manifest = cls(
                **{
                    **data,
                    "inputs": [TensorSpec(**t) for t in data["inputs"]],
                    "outputs": [TensorSpec(**t) for t in data["outputs"]],
                    "label_input": TensorSpec(**data["label_input"]),
                    "lora": LoraSettings.from_dict(data["lora"]),
                    "tiers": [Tier.from_dict(t) for t in data["tiers"]],
                }
            )
        except (KeyError, TypeError) as err:
            raise BundleError(f"Malformed bundle manifest: {err}") from err
        lookup = manifest.embedding_lookup
        if lookup is not None and not (
            isinstance(lookup, dict) and all(isinstance(lookup.get(k), str) for k in ("table", "ids", "input"))
            and lookup["ids"] in {spec.name for spec in manifest.inputs}
        ):
            raise BundleError(f"Malformed bundle manifest: embedding_lookup {lookup!r} needs string table, ids "
                              "(one of the inputs) and input. Re-export the bundle.")
        return manifest


def read_manifest(bundle: str | Path) -> Manifest:
    """Read and check `manifest.json` of a bundle folder."""
    path = Path(bundle) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle: {MANIFEST_FILE} is missing. Create one with fedpeft-export.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err
    return Manifest.from_dict(data)


def bundle_id(bundle: str | Path) -> str:
    """Identifies a bundle by its manifest, which already holds the base weights' SHA-256."""
    return hashlib.sha256((Path(bundle) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
