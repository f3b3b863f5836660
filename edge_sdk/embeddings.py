"""Token-embedding rows read from the bundle's safetensors file per batch, never the whole table.

The word-embedding table is the largest frozen tensor of a small language model (47 MB of
MiniLM-L6's 91 MB; hundreds of MB for LLM vocabularies) and training only gathers from it. A
bundle with an `embedding_lookup` leaves it out of the graphs; the device reads the rows a batch
uses with plain file reads, so the table stays in the OS page cache and out of the process's
resident memory (a memory map would not do: every page it touches counts as resident while
mapped, and the kernel maps 64 KB around each touched row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_sdk.protocol.manifest import BundleError

HEADER_LIMIT = 100 << 20


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts.

    The layout is safetensors' documented one: an 8-byte little-endian header length, the JSON
    header (name → dtype, shape, data_offsets relative to the data start), then raw row-major data.
    """
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= HEADER_LIMIT:
            raise BundleError(f"{path} is not a safetensors file (header length {size}). Re-export the bundle.")
        header = json.loads(handle.read(size))
    return header, 8 + size


class EmbeddingRows:
    """Gathers rows of one 2-D float32 tensor of a safetensors file: `rows(ids)` is `table[ids]`."""

    def __init__(self, path: Path, name: str) -> None:
        header, data_start = safetensors_header(path)
        entry = header.get(name)
        if entry is None:
            raise BundleError(f"{path.name} has no tensor '{name}' for the embedding lookup. Re-export the bundle.")
        shape, dtype = entry["shape"], entry["dtype"]
        if len(shape) != 2 or dtype != "F32":
            raise BundleError(f"Embedding table '{name}' is {dtype} {shape}, not a 2-D float32 table. Re-export it.")
        self.path, self.name = path, name
        self.vocab, self.dim = int(shape[0]), int(shape[1])
        self.offset = data_start + int(entry["data_offsets"][0])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The rows of `ids` (any shape of integer ids), shaped ids.shape + (dim,).

        Each run of consecutive ids is one read; the rows come back through a unique/inverse index.
        """
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"Token ids must lie in [0, {self.vocab}); got {ids.min()}..{ids.max()}. "
                             "Tokenize with the bundle's tokenizer.")
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((unique.size, self.dim), dtype=np.float32)
        starts = np.flatnonzero(np.diff(unique, prepend=-2) != 1)
        row_bytes = self.dim * rows.itemsize
        with open(self.path, "rb", buffering=0) as handle:
            for start, stop in zip(starts.tolist(), np.r_[starts[1:], unique.size].tolist()):
                handle.seek(self.offset + int(unique[start]) * row_bytes)
                if handle.readinto(memoryview(rows[start:stop]).cast("B")) != (stop - start) * row_bytes:
                    raise BundleError(f"{self.path} ends inside embedding table '{self.name}': the bundle is corrupt.")
        return rows[inverse.reshape(ids.shape)]
