"""Local data on the device: the `Dataset` protocol an app implements, batching and splits."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np

Features = Union[str, np.ndarray]


@dataclass(frozen=True)
class Example:
    """One labelled example: a text (text tasks) or an image array (H×W or H×W×C)."""

    x: Features
    label: int


class Dataset(Protocol):
    """What an app hands the trainer: anything that iterates over its local examples.

    A list of `Example` qualifies; so does a class reading a database cursor. The trainer
    iterates it once per call and keeps the examples in memory for the epochs of that call.
    """

    def __iter__(self) -> Iterator[Example]: ...


def batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int | None = None,
    lengths: Sequence[int] | None = None,
    bucket_batches: int = 50,
) -> Iterator[list[Example]]:
    """Batches of `batch_size`, shuffled with `seed` when given.

    With `lengths` (one per example), examples are length-bucketed: each window of `bucket_batches` batches is
    sorted by length before it is cut, so a batch holds sentences of similar length and per-batch
    padding wastes little; the batch order is shuffled again so training sees no length curriculum.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if seed is not None:
        rng.shuffle(order)
    if lengths is not None and len(lengths) != len(examples):
        raise ValueError(f"Got {len(lengths)} lengths for {len(examples)} examples.")
    if lengths is None:
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        window = batch_size * max(1, bucket_batches)
        chunks = []
        for start in range(0, len(order), window):
            part = sorted(order[start:start + window], key=lengths.__getitem__)
            chunks.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
        if seed is not None:
            rng.shuffle(chunks)
    for chunk in chunks:
        yield [examples[i] for i in chunk]


def stratified_split(
    examples: Iterable[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split keeping each label's share in both parts."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be within [0, 1], got {test_fraction}.")
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        cut = round(len(group) * test_fraction)
        test.extend(group[:cut])
        train.extend(group[cut:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
