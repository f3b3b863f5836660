"""Minimal on-device training and evaluation loops over an opened tier."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_sdk.bundle import OpenedTier
from edge_sdk.data import Example
from edge_sdk.ort_training import Optimizer

Encode = Callable[[Sequence[str]], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy over the evaluated examples."""

    loss: float
    accuracy: float
    samples: int


def train_steps(
    opened: OpenedTier, optimizer: Optimizer, encode: Encode, batches: Iterable[Sequence[Example]]
) -> list[float]:
    """One optimizer step per batch; returns the training losses."""
    opened.module.train()
    losses = []
    for batch in batches:
        labels = np.array([e.label for e in batch], dtype=np.int64)
        loss, _ = opened.module(*encode([e.text for e in batch]), labels)
        optimizer.step()
        opened.module.lazy_reset_grad()
        losses.append(float(loss))
    return losses


def evaluate(opened: OpenedTier, encode: Encode, batches: Iterable[Sequence[Example]]) -> EvalResult:
    """Sample-weighted loss and accuracy with the eval graph (dropout off)."""
    opened.module.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in batches:
        labels = np.array([e.label for e in batch], dtype=np.int64)
        loss, logits = opened.module(*encode([e.text for e in batch]), labels)
        total_loss += float(loss) * len(batch)
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
        seen += len(batch)
    if seen == 0:
        raise ValueError("evaluate() got no examples.")
    return EvalResult(loss=total_loss / seen, accuracy=correct / seen, samples=seen)
