"""Adapter codec: round trips per dtype, sizes, and a distinct clear error for every kind of bad payload."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_tensors

from edge_sdk.protocol import (
    AdapterHeader, ChecksumError, CodecError, DTypeError, HeaderError, MissingTensorError, NonFiniteError,
    NotAnAdapterError, PayloadTooLargeError, RankError, ShapeError, UnknownTensorError, VersionError, decode_adapter,
    encode_adapter,
)
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.codec import MAGIC, payload_digest
from edge_sdk.protocol.manifest import Manifest, read_manifest


@pytest.fixture(scope="module")
def manifest(minilm_bundle: Path) -> Manifest:
    return read_manifest(minilm_bundle)


def _adapter(manifest: Manifest, rank: int = 8, seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    lora = {p.layer: (rng.normal(size=(rank, p.a_shape[1])).astype(np.float32),
                      rng.normal(size=(p.b_shape[0], rank)).astype(np.float32)) for p in manifest.lora_pairs}
    head = {n: rng.normal(size=s).astype(np.float32) for n, s in manifest.head_shapes.items()}
    return Adapter(rank, lora, head)


def _header(**changes: object) -> AdapterHeader:
    base = dict(federation="fed", round=3, client_id="dev-1", rank=8, num_samples=120, metrics={"loss": 0.4})
    return AdapterHeader(**{**base, **changes})


def _split(payload: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<I", payload, 8)
    return json.loads(payload[12:12 + length]), payload[12 + length:]


def _frame(meta: dict, body: bytes, fix_checksum: bool = True) -> bytes:
    if fix_checksum:
        meta = {**meta, "tensor_bytes": len(body)}
        meta["sha256"] = payload_digest(meta, body)
    text = json.dumps(meta).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + body


def _with_tensors(payload: bytes, tensors: dict[str, np.ndarray], **meta_changes: object) -> bytes:
    meta, _ = _split(payload)
    return _frame({**meta, **meta_changes}, save_tensors(tensors))


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", 1e-3), ("int8", 1 / 127)])
def test_round_trip_per_dtype(manifest: Manifest, dtype: str, tolerance: float, order: str) -> None:
    """Column-major factors (what transposes and SVD outputs give) too: safetensors writes raw memory."""
    adapter = _adapter(manifest)
    adapter.lora = {k: (np.asarray(a, order=order), np.asarray(b, order=order)) for k, (a, b) in adapter.lora.items()}
    header, decoded = decode_adapter(encode_adapter(adapter, _header(dtype=dtype)), manifest)
    assert header == _header(dtype=dtype, head=True)
    assert decoded.rank == 8 and decoded.lora.keys() == adapter.lora.keys() and decoded.head.keys() == adapter.head.keys()
    for layer, (a, b) in adapter.lora.items():
        da, db = decoded.lora[layer]
        assert da.dtype == np.float32 and db.dtype == np.float32
        # int8 scales are per rank component: rows of A, columns of B.
        assert np.all(np.abs(da - a) <= tolerance * np.abs(a).max(axis=1, keepdims=True) + 1e-7)
        assert np.all(np.abs(db - b) <= tolerance * np.abs(b).max(axis=0, keepdims=True) + 1e-7)


def test_sizes_shrink_with_dtype(manifest: Manifest) -> None:
    adapter = _adapter(manifest)
    sizes = {d: len(encode_adapter(adapter, _header(dtype=d))) for d in ("float32", "float16", "int8")}
    raw = 4 * adapter.num_values
    assert raw < sizes["float32"] < raw + 8192
    assert sizes["float16"] < 0.52 * sizes["float32"]
    assert sizes["int8"] < 0.28 * sizes["float32"]


def test_zero_factors_quantize_without_division_by_zero(manifest: Manifest) -> None:
    adapter = _adapter(manifest)
    adapter.lora = {k: (np.zeros_like(a), np.zeros_like(b)) for k, (a, b) in adapter.lora.items()}
    _, decoded = decode_adapter(encode_adapter(adapter, _header(dtype="int8")), manifest)
    assert all(not a.any() and not b.any() for a, b in decoded.lora.values())


def test_framing_and_header_errors(manifest: Manifest) -> None:
    payload = encode_adapter(_adapter(manifest), _header())
    meta, body = _split(payload)
    with pytest.raises(PayloadTooLargeError):
        decode_adapter(payload, manifest, max_bytes=len(payload) - 1)
    with pytest.raises(NotAnAdapterError, match="magic"):
        decode_adapter(b"PK\x03\x04" + payload[4:], manifest)
    with pytest.raises(NotAnAdapterError, match="too short"):
        decode_adapter(payload[:5], manifest)
    with pytest.raises(NotAnAdapterError, match="Expected bytes"):
        decode_adapter("text", manifest)  # type: ignore[arg-type]
    with pytest.raises(HeaderError, match="out of bounds"):
        decode_adapter(MAGIC + struct.pack("<I", 10**6) + b"{}", manifest)
    with pytest.raises(HeaderError, match="not valid JSON"):
        decode_adapter(MAGIC + struct.pack("<I", 3) + b"{x}" + body, manifest)
    with pytest.raises(VersionError, match="version 1"):
        decode_adapter(_frame({**meta, "version": 1}, body), manifest)
    with pytest.raises(HeaderError, match="unexpected \\['extra'\\]"):
        decode_adapter(_frame({**meta, "extra": 1}, body), manifest)
    with pytest.raises(HeaderError, match="'round' must be int"):
        decode_adapter(_frame({**meta, "round": "3"}, body), manifest)
    with pytest.raises(HeaderError, match="must lie in \\[0, "):
        decode_adapter(_frame({**meta, "num_samples": -1}, body), manifest)
    with pytest.raises(HeaderError, match="metrics"):
        decode_adapter(_frame({**meta, "metrics": {"loss": "low"}}, body), manifest)
    with pytest.raises(DTypeError, match="bfloat16"):
        decode_adapter(_frame({**meta, "dtype": "bfloat16"}, body), manifest)
    with pytest.raises(RankError, match="rank 3 is not a tier"):
        decode_adapter(_frame({**meta, "rank": 3}, body), manifest)


def test_checksum_catches_corruption_and_truncation(manifest: Manifest) -> None:
    payload = bytearray(encode_adapter(_adapter(manifest), _header()))
    payload[-10] ^= 0xFF
    with pytest.raises(ChecksumError):
        decode_adapter(bytes(payload), manifest)
    with pytest.raises(ChecksumError):
        decode_adapter(bytes(payload[:-100]), manifest)


def test_the_checksum_covers_the_header(manifest: Manifest) -> None:
    """A captured update with its round (or sample count) rewritten no longer verifies."""
    payload = encode_adapter(_adapter(manifest), _header())
    meta, body = _split(payload)
    for change in ({"round": 4}, {"num_samples": 10**6}):
        with pytest.raises(ChecksumError, match="altered"):
            decode_adapter(_frame({**meta, **change}, body, fix_checksum=False), manifest)


def test_header_numbers_and_strings_are_bounded(manifest: Manifest) -> None:
    """Numbers that would overflow a merge or a log line are refused before any state changes."""
    meta, body = _split(encode_adapter(_adapter(manifest), _header()))
    text = json.dumps(meta)
    for raw in (text.replace('"num_samples": 120', '"num_samples": ' + "9" * 309),
                text.replace('"loss": 0.4', '"loss": NaN'), text.replace('"loss": 0.4', '"loss": 1e400'),
                text.replace('"loss": 0.4', '"loss": ' + "1" * 400)):
        encoded = raw.encode()
        with pytest.raises(HeaderError, match="not valid JSON"):
            decode_adapter(MAGIC + struct.pack("<I", len(encoded)) + encoded + body, manifest)
    for change, message in (({"num_samples": 2**31}, "must lie in"), ({"round": 2**40}, "must lie in"),
                            ({"client_id": "x" * 257}, "1 to 256 characters"),
                            ({"metrics": {"x" * 65: 1.0}}, "metrics"),
                            ({"metrics": {f"m{i}": 1.0 for i in range(65)}}, "metrics")):
        with pytest.raises(HeaderError, match=message):
            decode_adapter(_frame({**meta, **change}, body), manifest)


def test_tensor_errors(manifest: Manifest) -> None:
    adapter = _adapter(manifest)
    payload = encode_adapter(adapter, _header())
    tensors = {f"{k}::{s}": v for k, (a, b) in adapter.lora.items() for s, v in (("A", a), ("B", b))}
    tensors.update({f"head::{k}": v for k, v in adapter.head.items()})
    layer = manifest.lora_pairs[0].layer
    with pytest.raises(NotAnAdapterError, match="safetensors"):
        decode_adapter(_frame(_split(payload)[0], b"\x00" * 64), manifest)
    with pytest.raises(UnknownTensorError, match="evil"):
        decode_adapter(_with_tensors(payload, {**tensors, "m.evil::A": tensors[f"{layer}::A"]}), manifest)
    with pytest.raises(MissingTensorError, match=layer):
        decode_adapter(_with_tensors(payload, {k: v for k, v in tensors.items() if k != f"{layer}::B"}), manifest)
    with pytest.raises(ShapeError, match="expected A"):
        decode_adapter(_with_tensors(payload, {**tensors, f"{layer}::A": np.zeros((8, 100), np.float32)}), manifest)
    with pytest.raises(RankError, match="rank 2/2 but the header declares 8"):
        small = _adapter(manifest, rank=2)
        decode_adapter(_with_tensors(payload, {**tensors, f"{layer}::A": small.lora[layer][0],
                                               f"{layer}::B": small.lora[layer][1]}), manifest)
    with pytest.raises(DTypeError, match="float64"):
        decode_adapter(_with_tensors(payload, {**tensors, f"{layer}::A": tensors[f"{layer}::A"].astype(np.float64)}),
                       manifest)
    bad = tensors[f"{layer}::B"].copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=layer):
        decode_adapter(_with_tensors(payload, {**tensors, f"{layer}::B": bad}), manifest)
    with pytest.raises(NonFiniteError, match="beyond"):
        huge = {f"{layer}::A": tensors[f"{layer}::A"] * 1e20, f"{layer}::B": tensors[f"{layer}::B"] * 1e-20}
        decode_adapter(_with_tensors(payload, {**tensors, **huge}), manifest)
    head_name = next(iter(manifest.head_shapes))
    with pytest.raises(ShapeError, match="Head"):
        decode_adapter(_with_tensors(payload, {**tensors, f"head::{head_name}": np.zeros((3, 3), np.float32)}), manifest)
    quantized = encode_adapter(adapter, _header(dtype="int8"))
    with pytest.raises(MissingTensorError, match="scale"):
        meta, _ = _split(quantized)
        int8 = {k: (np.zeros(v.shape, np.int8) if v.ndim == 2 else v) for k, v in tensors.items()}
        decode_adapter(_frame(meta, save_tensors(int8)), manifest)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_payloads_only_ever_raise_codec_errors(manifest: Manifest, data: st.DataObject) -> None:
    payload = bytearray(encode_adapter(_adapter(manifest, rank=2), _header(rank=2, dtype="int8")))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        header, adapter = decode_adapter(bytes(payload[:cut]), manifest)
    except CodecError as err:
        assert str(err)
    else:
        assert header.rank == adapter.rank == 2
        assert all(np.isfinite(a).all() and np.isfinite(b).all() for a, b in adapter.lora.values())
