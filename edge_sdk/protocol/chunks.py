"""Chunked transfer of large payloads over MQTT, with per-chunk and whole-payload SHA-256.

Every adapter payload travels as one or more chunks: MAGIC | uint32 header length | JSON header
{version, sha256 (whole), size, index, count, chunk_sha256} | bytes. The receiver reassembles
per sender; a corrupt chunk, or a transfer that never completes, fails that payload only.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from edge_sdk.protocol.framing import frame, unframe

CHUNK_MAGIC = b"FPCHUNK\x00"
CHUNK_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1024
"""Smallest data size of a chunk but a transfer's last: bounds a transfer's chunk count by its size."""
_MAX_HEADER = 4096
_FIELDS = {"version": int, "sha256": str, "size": int, "index": int, "count": int, "chunk_sha256": str}


class ChunkError(ValueError):
    """A chunk is malformed, inconsistent with its transfer, or fails its checksum."""


@dataclass(frozen=True)
class Chunk:
    """One parsed chunk of the transfer identified by the whole payload's SHA-256."""

    sha256: str
    size: int
    index: int
    count: int
    data: bytes


def split_payload(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """`payload` as framed chunks of at most `chunk_size` data bytes each."""
    if chunk_size < MIN_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be at least {MIN_CHUNK_SIZE} bytes.")
    digest = hashlib.sha256(payload).hexdigest()
    pieces = [payload[i:i + chunk_size] for i in range(0, len(payload), chunk_size)] or [b""]
    out = []
    for index, piece in enumerate(pieces):
        out.append(frame(CHUNK_MAGIC, {
            "version": CHUNK_VERSION, "sha256": digest, "size": len(payload), "index": index,
            "count": len(pieces), "chunk_sha256": hashlib.sha256(piece).hexdigest(),
        }, piece))
    return out


def parse_chunk(message: bytes, max_size: int) -> Chunk:
    """Validate one framed chunk; `max_size` bounds the whole payload it may belong to."""
    header, data = unframe(message, CHUNK_MAGIC, _MAX_HEADER, "chunk", ChunkError, ChunkError)
    if set(header) != set(_FIELDS):
        raise ChunkError(f"Chunk header must have exactly the fields {sorted(_FIELDS)}.")
    for key, kind in _FIELDS.items():
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise ChunkError(f"Chunk header field {key!r} must be {kind.__name__}.")
    if header["version"] != CHUNK_VERSION:
        raise ChunkError(f"Chunk format version {header['version']} is not supported (this peer reads {CHUNK_VERSION}).")
    size, index, count = header["size"], header["index"], header["count"]
    if not 0 <= size <= max_size:
        raise ChunkError(f"Transfer of {size} bytes exceeds the {max_size}-byte limit.")
    if not (1 <= count <= max(1, -(-size // MIN_CHUNK_SIZE)) and 0 <= index < count):
        raise ChunkError(f"Chunk index {index} of {count} is out of range for a {size}-byte transfer.")
    if len(data) > size:
        raise ChunkError(f"Chunk {index} holds {len(data)} bytes of a {size}-byte transfer.")
    if hashlib.sha256(data).hexdigest() != header["chunk_sha256"]:
        raise ChunkError(f"Chunk {index} of {count} fails its SHA-256: corrupted in transit.")
    return Chunk(header["sha256"], size, index, count, data)


@dataclass
class _Transfer:
    size: int
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    collected: int = 0


class Reassembler:
    """Collects chunks per sender; one open transfer per sender (a new one fails the old)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._open: dict[str, tuple[str, _Transfer]] = {}

    def add(self, sender: str, message: bytes) -> tuple[bytes | None, str | None]:
        """Feed a chunk: (complete payload or None, reason a previous transfer of `sender` failed or None).

        Raises ChunkError for a bad chunk; the sender's open transfer is dropped with it.
        """
        try:
            chunk = parse_chunk(message, self.max_size)
        except ChunkError:
            self._open.pop(sender, None)
            raise
        failed = None
        current = self._open.get(sender)
        if current is not None and current[0] != chunk.sha256:
            failed = f"transfer {current[0][:12]} incomplete ({len(current[1].parts)}/{current[1].count} chunks)"
            current = None
        if current is None:
            current = (chunk.sha256, _Transfer(chunk.size, chunk.count))
            self._open[sender] = current
        transfer = current[1]
        if (chunk.size, chunk.count) != (transfer.size, transfer.count):
            self._open.pop(sender, None)
            raise ChunkError("Chunk disagrees with its transfer's size or chunk count.")
        transfer.collected += len(chunk.data) - len(transfer.parts.get(chunk.index, b""))
        if transfer.collected > transfer.size:
            self._open.pop(sender, None)
            raise ChunkError(f"Chunks carry more than the transfer's declared {transfer.size} bytes.")
        transfer.parts[chunk.index] = chunk.data
        if len(transfer.parts) < transfer.count:
            return None, failed
        del self._open[sender]
        payload = b"".join(transfer.parts[i] for i in range(transfer.count))
        if len(payload) != transfer.size or hashlib.sha256(payload).hexdigest() != chunk.sha256:
            raise ChunkError("Reassembled payload fails its SHA-256: chunks from different transfers were mixed.")
        return payload, failed

    def expire(self, older_than: float) -> dict[str, str]:
        """Drop transfers started more than `older_than` seconds ago: sender → reason."""
        now = time.monotonic()
        stale = {s: t for s, (_, t) in self._open.items() if now - t.started > older_than}
        for sender in stale:
            del self._open[sender]
        return {s: f"missing chunks: {len(t.parts)}/{t.count} arrived" for s, t in stale.items()}

    def pending(self) -> dict[str, str]:
        """Open transfers, sender → progress."""
        return {s: f"{len(t.parts)}/{t.count} chunks" for s, (_, t) in self._open.items()}
