"""Opened tiers shared by the devices of one process, one device training at a time.

A phone runs one `FederatedClient` with its own pool of one. A simulation runs a hundred clients
in one process: opening a tier per client would hold a hundred sessions, so they share one per
(rank, threads) and bring their own trainable state to it (`Trainer.load_state`). The lock also
keeps the host's cores to one device at a time, so measured training times stay per device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.trainer import HeadMode, Trainer


class TrainerPool:
    """Lends an opened `Trainer` per (rank, threads); `lease` blocks while another device trains."""

    def __init__(self, bundle: str | Path, *, device: str = "cpu", head: HeadMode = "shared") -> None:
        self.bundle, self.device, self.head = Path(bundle), device, head
        self._trainers: dict[tuple[int, int | None], Trainer] = {}
        self._lock = threading.RLock()

    @contextmanager
    def lease(self, rank: int, threads: int | None = None) -> Iterator[Trainer]:
        """The trainer of tier `rank`, exclusively for the `with` block."""
        with self._lock:
            key = (rank, threads)
            if key not in self._trainers:
                self._trainers[key] = Trainer(self.bundle, rank, device=self.device, threads=threads, head=self.head)
            yield self._trainers[key]
