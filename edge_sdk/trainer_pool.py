"""Opened tiers shared by the devices of one process, as many training at once as the host has cores for.

A phone runs one `FederatedClient` with its own pool of one. A simulation runs a hundred clients
in one process: opening a tier per client would hold a hundred sessions, so they share one per
(rank, threads) and bring their own trainable state to it (`Trainer.load_state`). A lease takes
its trainer's threads out of the host's cores until it ends, so two one-thread devices train side
by side on two cores while a device with every core trains alone: each device's measured training
time stays that of its own threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.runtime import Backend
from edge_sdk.trainer import HeadMode, Trainer


def trainer_for(bundle: str | Path, rank: int, **options) -> Trainer:
    """The trainer of the bundle's task: `LanguageTrainer` for a causal LM, else `Trainer`."""
    if read_manifest(bundle).task == "causal-lm":
        from edge_sdk.language import LanguageTrainer

        return LanguageTrainer(bundle, rank, **options)
    return Trainer(bundle, rank, **options)


class TrainerPool:
    """Lends an opened `Trainer` per (rank, threads); `lease` blocks while that trainer or the cores are busy."""

    def __init__(self, bundle: str | Path, *, device: str = "cpu", head: HeadMode = "shared",
                 cores: int | None = None, backend: Backend = "auto") -> None:
        self.bundle, self.device, self.head, self.backend = Path(bundle), device, head, backend
        self.cores = cores or os.cpu_count() or 1
        self._trainers: dict[tuple[int, int | None], Trainer] = {}
        self._busy: set[tuple[int, int | None]] = set()
        self._free = self.cores
        self._changed = threading.Condition()

    @contextmanager
    def lease(self, rank: int, threads: int | None = None) -> Iterator[Trainer]:
        """The trainer of tier `rank` at `threads` (None: every core), exclusively for the `with` block."""
        key, need = (rank, threads), min(threads or self.cores, self.cores)
        with self._changed:
            self._changed.wait_for(lambda: key not in self._busy and self._free >= need)
            self._busy.add(key)
            self._free -= need
        try:
            if key not in self._trainers:
                self._trainers[key] = trainer_for(self.bundle, rank, device=self.device, threads=threads,
                                                  head=self.head, backend=self.backend)
            yield self._trainers[key]
        finally:
            with self._changed:
                self._busy.discard(key)
                self._free += need
                self._changed.notify_all()
