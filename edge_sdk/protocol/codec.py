"""Adapter codec: the bytes that cross the network for one adapter, and their strict validation.

Layout (`framing`): MAGIC (8 bytes) | header length (uint32 little-endian) | JSON header | safetensors bytes.
The header says who sent what (federation, round, client, rank, sample count, metrics, dtype)
and carries a SHA-256 over the rest of the header and the safetensors bytes (corruption of either
is caught; who sent it is the broker's to vouch for: a device may publish on its own topic only). Tensors are named `<layer>::A`, `<layer>::B`
and `head::<parameter>`; int8 tensors carry a float32 `<name>::scale` per rank component. Feature
statistics, when sent, are `stats::gram` (its upper triangle, row by row), `stats::sums` (float32
whatever the dtype: they are sums) and `stats::counts` (int64).
Decoding checks everything against the bundle manifest before returning anything: a payload is
either wholly valid or rejected with one of the distinct `CodecError` subclasses below. No
pickle anywhere: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import get_args

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.framing import PREFIX, frame, unframe
from edge_sdk.protocol.manifest import Manifest
from edge_sdk.protocol.messages import DType
from edge_sdk.protocol.statistics import FeatureStatistics, PriorStatistics, StatisticsError

MAGIC = b"FEDPEFT\x00"
FORMAT = "fedpeft-adapter"
CODEC_VERSION = 2
DTYPES: tuple[DType, ...] = get_args(DType)
MAX_HEADER_BYTES = 64 * 1024
MAX_ID_CHARS = 256
"""Longest federation or client id a header may carry."""
MAX_METRICS = 64
MAX_METRIC_NAME_CHARS = 64
MAX_COUNT = 2**31 - 1
"""Largest round, rank, sample count or byte count a header may declare."""
MAX_ABS_VALUE = 1e6
"""Largest magnitude of a tensor value: LoRA factors and heads are O(1); this keeps every Gram matrix
of a merge far from float32 overflow."""
_HEADER_FIELDS = {
    "format": str, "version": int, "federation": str, "round": int, "client_id": str, "rank": int,
    "num_samples": int, "metrics": dict, "dtype": str, "head": bool, "sha256": str, "tensor_bytes": int,
}


class CodecError(ValueError):
    """An adapter payload was rejected; the subclass says why."""


class PayloadTooLargeError(CodecError):
    """The payload exceeds the size any adapter of this bundle can have."""


class NotAnAdapterError(CodecError):
    """The bytes are not a FedPEFT adapter payload (wrong magic or broken framing/tensor block)."""


class HeaderError(CodecError):
    """The JSON header is malformed or violates the schema."""


class VersionError(CodecError):
    """The payload was written by an incompatible codec version."""


class DTypeError(CodecError):
    """Unknown dtype, or tensors whose dtype does not match the declared one."""


class RankError(CodecError):
    """The declared rank is not a tier of the bundle, or the factors have another rank."""


class ChecksumError(CodecError):
    """The tensor bytes do not match the header's length or SHA-256."""


class UnknownTensorError(CodecError):
    """A tensor names a layer or head parameter the bundle does not have."""


class MissingTensorError(CodecError):
    """A layer's factors (or a declared head parameter) are missing."""


class ShapeError(CodecError):
    """A tensor's shape disagrees with the manifest."""


class NonFiniteError(CodecError):
    """A tensor holds NaN, Inf or a value beyond ±MAX_ABS_VALUE."""


class BadStatisticsError(CodecError):
    """Feature statistics that are incomplete, of the wrong shape, or impossible for real features."""


STATISTICS_KEYS = ("stats::gram", "stats::sums", "stats::counts")
PRIOR_KEYS = ("prior::counts", "prior::predicted")


@dataclass(frozen=True)
class AdapterHeader:
    """Who sent an adapter and what it describes."""

    federation: str
    round: int
    client_id: str
    rank: int
    num_samples: int
    dtype: DType = "float32"
    metrics: dict[str, float] = field(default_factory=dict)
    head: bool = False


def max_payload_bytes(manifest: Manifest) -> int:
    """Largest valid payload for this bundle: the biggest tier (LoRA + head) in float32, names and header."""
    tier = max(manifest.tiers, key=lambda t: t.rank)
    tensors = 2 * len(tier.lora_pairs) + len(manifest.head_parameters)
    values = sum(p.a_shape[0] * p.a_shape[1] + p.b_shape[0] * p.b_shape[1] for p in tier.lora_pairs)
    values += sum(int(np.prod(shape)) for shape in manifest.head_shapes.values())
    width = manifest.feature_width
    if width is not None:
        values += width * (width + 1) // 2 + (width + 2) * len(manifest.labels)
        tensors += len(STATISTICS_KEYS)
    values += 2 * len(manifest.labels)
    tensors += len(PRIOR_KEYS)
    return 4 * values + 512 * tensors + MAX_HEADER_BYTES + PREFIX.size


def encode_adapter(adapter: Adapter, header: AdapterHeader) -> bytes:
    """Serialize `adapter` with `header` (rank and head flag are taken from the adapter)."""
    if header.dtype not in DTYPES:
        raise DTypeError(f"Unknown dtype {header.dtype!r}; use one of {DTYPES}.")
    tensors: dict[str, np.ndarray] = {}
    for layer, (a, b) in adapter.lora.items():
        tensors.update(_encode_tensor(f"{layer}::A", a, header.dtype, axis=0))
        tensors.update(_encode_tensor(f"{layer}::B", b, header.dtype, axis=1))
    for name, value in adapter.head.items():
        tensors.update(_encode_tensor(f"head::{name}", value, header.dtype, axis=0))
    if adapter.statistics is not None:
        stats = adapter.statistics
        tensors.update(zip(STATISTICS_KEYS, (
            stats.gram[np.triu_indices(stats.gram.shape[0])].astype(np.float32),
            np.ascontiguousarray(stats.sums, dtype=np.float32), stats.counts.astype(np.int64))))
    if adapter.prior is not None:
        tensors.update(zip(PRIOR_KEYS, (adapter.prior.counts.astype(np.int64),
                                        np.ascontiguousarray(adapter.prior.predicted, dtype=np.float32))))
    body = save_tensors(tensors)
    meta = {
        "format": FORMAT, "version": CODEC_VERSION,
        **asdict(header), "rank": adapter.rank, "head": bool(adapter.head),
        "metrics": {k: float(v) for k, v in header.metrics.items()},
        "tensor_bytes": len(body),
    }
    payload = frame(MAGIC, {**meta, "sha256": payload_digest(meta, body)}, body)
    header_bytes = len(payload) - len(body) - PREFIX.size
    if header_bytes > MAX_HEADER_BYTES:
        raise HeaderError(f"Header of {header_bytes} bytes exceeds {MAX_HEADER_BYTES}: send fewer metrics.")
    return payload


def decode_adapter(payload: bytes, manifest: Manifest, max_bytes: int | None = None) -> tuple[AdapterHeader, Adapter]:
    """Validate `payload` against `manifest` and return its header and float32 adapter."""
    limit = max_bytes if max_bytes is not None else max_payload_bytes(manifest)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise NotAnAdapterError(f"Expected bytes, got {type(payload).__name__}.")
    payload = bytes(payload)
    if len(payload) > limit:
        raise PayloadTooLargeError(f"Payload of {len(payload)} bytes exceeds the {limit}-byte limit for this bundle.")
    meta, body = unframe(payload, MAGIC, MAX_HEADER_BYTES, "adapter payload", NotAnAdapterError, HeaderError)
    _check_header(meta)
    if meta["rank"] not in manifest.ranks:
        raise RankError(f"Declared rank {meta['rank']} is not a tier of this bundle {manifest.ranks}.")
    if meta["tensor_bytes"] != len(body) or payload_digest(meta, body) != meta["sha256"]:
        raise ChecksumError("Header and tensor bytes do not match the header's length and SHA-256: "
                            "corrupted, truncated or altered.")
    try:
        tensors = load_tensors(body)
    except (SafetensorError, ValueError) as err:
        raise NotAnAdapterError(f"Tensor block is not valid safetensors: {err}") from err
    adapter = _adapter_from_tensors(tensors, manifest, meta)
    header = AdapterHeader(
        federation=meta["federation"], round=meta["round"], client_id=meta["client_id"], rank=meta["rank"],
        num_samples=meta["num_samples"], dtype=meta["dtype"], metrics=meta["metrics"], head=meta["head"],
    )
    return header, adapter


def payload_digest(meta: Mapping[str, object], body: bytes) -> str:
    """SHA-256 of the header (sorted JSON, without its `sha256` field) followed by the tensor bytes."""
    header = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(header.encode() + body).hexdigest()


def _check_header(meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise HeaderError(f"Header format is {meta.get('format')!r}, not {FORMAT!r}.")
    if meta.get("version") != CODEC_VERSION:
        raise VersionError(f"Codec version {meta.get('version')!r} is not supported (this peer reads {CODEC_VERSION}).")
    missing, extra = _HEADER_FIELDS.keys() - meta.keys(), meta.keys() - _HEADER_FIELDS.keys()
    if missing or extra:
        raise HeaderError(f"Header fields: missing {sorted(missing)}, unexpected {sorted(extra)}.")
    for key, kind in _HEADER_FIELDS.items():
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HeaderError(f"Header field {key!r} must be {kind.__name__}, got {type(value).__name__}.")
    for key in ("round", "rank", "num_samples", "tensor_bytes"):
        if not 0 <= meta[key] <= MAX_COUNT:
            raise HeaderError(f"Header field {key!r} must lie in [0, {MAX_COUNT}], got {meta[key]}.")
    for key in ("client_id", "federation"):
        if not 0 < len(meta[key]) <= MAX_ID_CHARS:
            raise HeaderError(f"Header field {key!r} must hold 1 to {MAX_ID_CHARS} characters.")
    metrics = meta["metrics"]
    if len(metrics) > MAX_METRICS or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_METRIC_NAME_CHARS and isinstance(v, (int, float))
            and not isinstance(v, bool) for k, v in metrics.items()):
        raise HeaderError(f"Header 'metrics' must map at most {MAX_METRICS} names of 1 to {MAX_METRIC_NAME_CHARS} "
                          "characters to finite numbers.")
    if meta["dtype"] not in DTYPES:
        raise DTypeError(f"Unknown dtype {meta['dtype']!r}; this peer reads {DTYPES}.")


def _encode_tensor(key: str, value: np.ndarray, dtype: str, axis: int) -> dict[str, np.ndarray]:
    value = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "float32" or (dtype == "int8" and value.ndim != 2):
        return {key: value}
    if dtype == "float16":
        return {key: value.astype(np.float16)}
    peak = np.max(np.abs(value), axis=1 - axis, keepdims=True)
    scale = (peak / 127.0).astype(np.float32)
    quantized = np.rint(value / np.where(scale > 0, scale, 1.0)).clip(-127, 127).astype(np.int8)
    return {key: quantized, f"{key}::scale": scale.ravel()}


def _decode_tensor(key: str, tensors: Mapping[str, np.ndarray], dtype: str, axis: int) -> np.ndarray:
    value = tensors[key]
    expected = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[dtype]
    if dtype == "int8" and value.ndim != 2:
        expected = np.float32
    if value.dtype != expected:
        raise DTypeError(f"Tensor {key} is {value.dtype}, but the header declares {dtype}.")
    if expected is not np.int8:
        return value.astype(np.float32)
    scale = tensors.get(f"{key}::scale")
    if scale is None:
        raise MissingTensorError(f"int8 tensor {key} has no {key}::scale.")
    if scale.dtype != np.float32 or scale.shape != (value.shape[axis],):
        raise ShapeError(f"{key}::scale must be float32 of shape ({value.shape[axis]},), got {scale.dtype} {scale.shape}.")
    if not np.all(np.isfinite(scale)):
        raise NonFiniteError(f"{key}::scale holds NaN or Inf.")
    return value.astype(np.float32) * (scale[:, None] if axis == 0 else scale[None, :])


def _adapter_from_tensors(tensors: Mapping[str, np.ndarray], manifest: Manifest, meta: dict) -> Adapter:
    rank, dtype = meta["rank"], meta["dtype"]
    pairs = manifest.tier(rank).lora_pairs
    head_names = manifest.head_parameters if meta["head"] else []
    keys = [f"{p.layer}::{side}" for p in pairs for side in ("A", "B")] + [f"head::{n}" for n in head_names]
    scaled = {k for k in tensors if k.endswith("::scale")}
    unknown = sorted(set(tensors) - set(keys) - scaled - {f"{k}::scale" for k in keys} - set(STATISTICS_KEYS)
                     - set(PRIOR_KEYS))
    if unknown:
        raise UnknownTensorError(f"Tensors not in this bundle: {unknown[:5]}.")
    absent = [k for k in keys if k not in tensors]
    if absent:
        raise MissingTensorError(f"Missing tensors: {absent[:5]}{' …' if len(absent) > 5 else ''}.")
    if dtype != "int8" and scaled:
        raise DTypeError(f"Scale tensors are only valid with int8, not {dtype}.")
    lora = {}
    for pair in pairs:
        a_key, b_key = f"{pair.layer}::A", f"{pair.layer}::B"
        a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != pair.a_shape[1] or b_shape[0] != pair.b_shape[0]:
            raise ShapeError(
                f"{pair.layer}: A {a_shape} / B {b_shape}, expected A (r, {pair.a_shape[1]}) / B ({pair.b_shape[0]}, r)."
            )
        if a_shape[0] != rank or b_shape[1] != rank:
            raise RankError(f"{pair.layer}: factors have rank {a_shape[0]}/{b_shape[1]} but the header declares {rank}.")
        lora[pair.layer] = (_decode_tensor(a_key, tensors, dtype, 0), _decode_tensor(b_key, tensors, dtype, 1))
    for name in head_names:
        if list(tensors[f"head::{name}"].shape) != manifest.head_shapes[name]:
            raise ShapeError(f"Head {name}: shape {tensors[f'head::{name}'].shape}, expected {manifest.head_shapes[name]}.")
    head = {name: _decode_tensor(f"head::{name}", tensors, dtype, 0) for name in head_names}
    for name, value in [*((f"{k}::A/B", np.concatenate([a.ravel(), b.ravel()])) for k, (a, b) in lora.items()),
                        *head.items()]:
        if not np.all(np.isfinite(value)):
            raise NonFiniteError(f"{name} holds NaN or Inf.")
        if value.size and float(np.abs(value).max()) > MAX_ABS_VALUE:
            raise NonFiniteError(f"{name} holds values beyond ±{MAX_ABS_VALUE:g}.")
    return Adapter(rank=rank, lora=lora, head=head, statistics=_statistics(tensors, manifest),
                   prior=_prior(tensors, manifest))


def _prior(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> PriorStatistics | None:
    """The payload's prior statistics (None when it carries none), checked by `PriorStatistics.check`."""
    present = [k for k in PRIOR_KEYS if k in tensors]
    if not present:
        return None
    if len(present) != len(PRIOR_KEYS):
        raise BadStatisticsError(f"Prior statistics need all of {PRIOR_KEYS}; got {present}.")
    counts, predicted = (tensors[k] for k in PRIOR_KEYS)
    if counts.dtype != np.int64 or predicted.dtype != np.float32:
        raise BadStatisticsError("Prior statistics must be int64 (counts) and float32 (predicted).")
    if counts.size and int(counts.max()) > MAX_COUNT:
        raise BadStatisticsError(f"prior::counts must lie in [0, {MAX_COUNT}].")
    prior = PriorStatistics(counts.copy(), predicted.astype(np.float64))
    try:
        prior.check(len(manifest.labels))
    except StatisticsError as err:
        raise BadStatisticsError(str(err)) from None
    return prior


def _statistics(tensors: Mapping[str, np.ndarray], manifest: Manifest) -> FeatureStatistics | None:
    """The payload's feature statistics (None when it carries none), checked by `FeatureStatistics.check`."""
    present = [k for k in STATISTICS_KEYS if k in tensors]
    if not present:
        return None
    width, classes = manifest.feature_width, len(manifest.labels)
    if width is None:
        raise BadStatisticsError("This bundle has no features output, so it takes no feature statistics.")
    if len(present) != len(STATISTICS_KEYS):
        raise BadStatisticsError(f"Feature statistics need all of {STATISTICS_KEYS}; got {present}.")
    packed, sums, counts = (tensors[k] for k in STATISTICS_KEYS)
    if packed.dtype != np.float32 or sums.dtype != np.float32 or counts.dtype != np.int64:
        raise BadStatisticsError("Feature statistics must be float32 (gram, sums) and int64 (counts).")
    if packed.shape != (width * (width + 1) // 2,):
        raise BadStatisticsError(f"stats::gram has shape {packed.shape}, expected ({width * (width + 1) // 2},): "
                                 f"the upper triangle of a {width} × {width} matrix.")
    if counts.shape == (classes,) and not 0 <= int(counts.min()) <= int(counts.max()) <= MAX_COUNT:
        raise BadStatisticsError(f"stats::counts must lie in [0, {MAX_COUNT}].")
    gram = np.zeros((width, width))
    gram[np.triu_indices(width)] = packed
    gram = gram + np.triu(gram, 1).T
    stats = FeatureStatistics(gram, sums.astype(np.float64), counts)
    try:
        stats.check(classes, width)
    except StatisticsError as err:
        raise BadStatisticsError(str(err)) from None
    if max(float(np.abs(gram).max()), float(np.abs(stats.sums).max())) > MAX_ABS_VALUE * stats.samples:
        raise BadStatisticsError(f"Feature statistics beyond ±{MAX_ABS_VALUE:g} per example.")
    return stats
