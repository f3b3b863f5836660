"""Each round's global adapters: merged from the accepted updates, saved per tier with ΔW_g and a peft folder.

Without a server optimizer the strategy's merge replaces the global. With one, the server state
(`aggregator.server_state`) is stepped with the merged updates against the globals the clients
were sent; round 0 then holds the starting state and the globals the first round trains from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aggregator.privacy import KEY, LEDGER, DpSettings, Sampling, default_delta, epsilon, new_key
from aggregator.round_merge import SAMPLE_CAP, merge_round, merge_with_server
from aggregator.server_state import ServerOptimizer, ServerState, initial_adapter, initial_state, tier_adapters
from aggregator.state import StateDir, StateError
from aggregator.strategies import SvdFactors, get_strategy
from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.peft_format import write_peft_adapter
from edge_sdk.protocol import Adapter, AdapterHeader, HeadMode, Manifest, decode_adapter, encode_adapter

AGGREGATOR_ID = "aggregator"


class GlobalModel:
    """Produces and persists the global adapters of a federation's rounds."""

    def __init__(self, bundle: Path, manifest: Manifest, store: StateDir, federation: str, strategy: str,
                 head: HeadMode, optimizer: ServerOptimizer | None, sample_cap: float = SAMPLE_CAP,
                 closed_form_head: bool = False, privacy: DpSettings | None = None) -> None:
        self.bundle, self.manifest, self.store, self.sample_cap = bundle, manifest, store, sample_cap
        self.closed_form_head, self.privacy = closed_form_head, privacy
        self.federation, self.strategy, self.head, self.optimizer = federation, strategy, head, optimizer
        self.form = get_strategy(strategy).state
        if optimizer is not None and self.form is None:
            raise ValueError(f"Strategy '{strategy}' keeps no server state; run it without a server optimizer.")
        self._filler: dict[str, np.ndarray] = {}

    def start(self, open_round: int) -> None:
        """With a server optimizer: check that the state `open_round` continues from is there, or write round 0
        (the starting state and the globals the first round trains from) for a new federation."""
        if self.optimizer is None:
            return
        assert self.form is not None
        with_head = self.head == "shared" and bool(self.manifest.head_parameters)
        start = initial_adapter(self.bundle, self.manifest, max(self.manifest.ranks), with_head)
        self._filler = {name: a for name, (a, _) in start.lora.items()}
        if self.store.server_state(open_round - 1, self.form) is not None:
            return
        if open_round > 1:
            raise StateError(f"{self.store.root} holds no server state for round {open_round - 1} (was it started "
                             "without a server optimizer?); use another --state-dir.")
        layers = layer_specs_from_manifest(self.manifest)
        state = initial_state(start, layers, self.form)
        if get_strategy(self.strategy).private:
            state.moments[KEY] = new_key()
        tiers, svds = tier_adapters(state, layers, self.manifest.ranks, self._filler)
        self._save(0, tiers, svds, 0)
        self.store.save_server_state(0, state)

    def close(self, round_number: int, accepted: Mapping[str, tuple[AdapterHeader, Adapter]],
              sampling: Sampling | None = None) -> tuple[dict[int, bytes], float, tuple[float | None, float] | None]:
        """Merge the round's accepted updates; save its globals, ΔW_g, the server state and the peft folder.

        Returns the per-tier payloads, the seconds the merge (and the server step) took, and for a
        private strategy the (ε, δ) spent by all rounds so far (ε None without noise).
        """
        started = time.perf_counter()
        server_state = None
        if self.optimizer is None:
            tiers, result = merge_round(self.strategy, accepted, self.manifest, self.sample_cap)
        else:
            assert self.form is not None
            previous = self.store.server_state(round_number - 1, self.form)
            if previous is None:
                raise StateError(f"{self.store.root}: the server state of round {round_number - 1} is missing.")
            sent = {rank: decode_adapter(p, self.manifest)[1] for rank, p in self.store.globals(round_number - 1).items()}
            tiers, result, server_state = merge_with_server(self.strategy, accepted, sent, previous, self.optimizer,
                                                            self.manifest, self._filler, self.sample_cap,
                                                            self.closed_form_head, self.privacy, sampling)
        merge_seconds = time.perf_counter() - started
        payloads = self._save(round_number, tiers, result.global_state, sum(h.num_samples for h, _ in accepted.values()))
        if server_state is not None:
            self.store.save_server_state(round_number, server_state)
        write_peft_adapter(tiers[max(tiers)], self.manifest, self.store.peft_dir(round_number), self.bundle)
        return payloads, merge_seconds, self._spent(server_state)

    def _spent(self, state: ServerState | None) -> tuple[float | None, float] | None:
        """(ε, δ) of the privacy ledger in `state` (ε None when it is unbounded: no noise)."""
        if state is None or LEDGER not in state.moments or self.privacy is None:
            return None
        ledger = state.moments[LEDGER]
        delta = self.privacy.delta or default_delta(ledger)
        spent = epsilon(ledger, delta)
        return (spent if math.isfinite(spent) else None), delta

    def _save(self, round_number: int, tiers: dict[int, Adapter], global_state: dict[str, SvdFactors],
              samples: int) -> dict[int, bytes]:
        payloads = {
            rank: encode_adapter(adapter, AdapterHeader(
                federation=self.federation, round=round_number, client_id=AGGREGATOR_ID, rank=rank,
                num_samples=samples, dtype="float32"))
            for rank, adapter in tiers.items()
        }
        factors = {f"{layer}::{part}": np.ascontiguousarray(getattr(f, part.lower()), dtype=np.float32)
                   for layer, f in global_state.items() for part in ("U", "S", "V")}
        self.store.save_globals(round_number, payloads, factors)
        return payloads
