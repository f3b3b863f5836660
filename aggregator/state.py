"""The aggregator's state directory: everything a restarted aggregator needs to resume a round.

Layout (every file written atomically; JSON, safetensors and FedPEFT adapter payloads only):
    state.json                        federation, bundle id, strategy, the open round and its task
    rounds/0003/updates/<client>.fpa  accepted updates of round 3, as received (re-validated on load)
    rounds/0003/chunks/<client>/      the chunks of a multi-chunk update still arriving (acknowledged
                                      to the broker only once written here; dropped when it completes)
    rounds/0003/global-r8.fpa         round 3's global adapter for tier r=8 (codec payload)
    rounds/0003/global-factors.safetensors   ΔW_g factors per layer (U, S, V)
    rounds/0003/peft/                 the global adapter as a Hugging Face peft folder
    rounds/0003/metrics.json          the round's metrics (also appended to the metrics file)
    rounds/0003/server-state.safetensors  with a server optimizer: the global adapter and its moments
    rounds/0000/                      with a server optimizer: the starting state and globals
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save

from aggregator.server_state import ServerState, StateForm
from edge_sdk.files import write_atomic
from edge_sdk.protocol import RoundTask, check_identifier
from edge_sdk.protocol.messages import MessageError, message_from_dict

STATE_VERSION = 1
PAYLOAD_SUFFIX = ".fpa"
SERVER_STATE_FILE = "server-state.safetensors"


class StateError(RuntimeError):
    """The state directory belongs to another federation or bundle, or is unreadable."""


@dataclass
class AggregatorState:
    """Where the federation stands: `round` is the open (or next) round; `task` its published task."""

    federation: str
    bundle_id: str
    strategy: str
    round: int = 1
    task: RoundTask | None = None
    server_optimizer: dict | None = None
    """The server optimizer's settings (None: the merge replaces the global each round)."""
    announced: int | None = None
    """The last round whose result was appended to the metrics file and published (None: a state
    written before this was recorded, taken as announced)."""


class StateDir:
    """Reads and writes one federation's state directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, federation: str, bundle_id: str, strategy: str,
             server_optimizer: dict | None = None) -> AggregatorState:
        """The saved state, or a fresh one; refuses a directory of another federation/bundle/strategy/server optimizer."""
        path = self.root / "state.json"
        if not path.exists():
            return AggregatorState(federation, bundle_id, strategy, server_optimizer=server_optimizer, announced=0)
        try:
            data = json.loads(path.read_text())
            if data.pop("version") != STATE_VERSION:
                raise StateError(f"{path} was written by another state format version.")
            task = data.pop("task")
            state = AggregatorState(**data, task=message_from_dict(RoundTask, task) if task else None)
        except (OSError, ValueError, KeyError, TypeError, MessageError) as err:
            raise StateError(f"Cannot read {path}: {err}. Move the directory aside to start a new federation.") from err
        mine = (federation, bundle_id, strategy, server_optimizer)
        if (state.federation, state.bundle_id, state.strategy, state.server_optimizer) != mine:
            raise StateError(
                f"{self.root} holds federation {state.federation!r} (bundle {state.bundle_id}, strategy "
                f"{state.strategy}, server optimizer {state.server_optimizer}), not {mine}: use another --state-dir "
                "to start a new federation."
            )
        self._remove_interrupted_writes()
        return state

    def _remove_interrupted_writes(self) -> None:
        """Remove what writes cut short by a kill left behind: every atomic write and peft folder swap
        works on a dot-named sibling of its target (`.<name>.<random>`, `.<name>.old`), and nothing
        else in a state directory starts with a dot."""
        folders = [self.root, *sorted((self.root / "rounds").glob("[0-9]*"))]
        folders += [sub for folder in folders[1:] for sub in (folder / "updates", folder / "chunks") if sub.is_dir()]
        folders += [sub for folder in folders if folder.name == "chunks" for sub in folder.iterdir() if sub.is_dir()]
        for folder in folders:
            for leftover in folder.glob(".*"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def save(self, state: AggregatorState) -> None:
        body = {"version": STATE_VERSION, **asdict(state)}
        write_atomic(self.root / "state.json", json.dumps(body, indent=1, sort_keys=True).encode())

    def round_dir(self, round_number: int) -> Path:
        return self.root / "rounds" / f"{round_number:04d}"

    def save_update(self, round_number: int, client_id: str, payload: bytes) -> None:
        check_identifier(client_id, "Client id")
        write_atomic(self.round_dir(round_number) / "updates" / f"{client_id}{PAYLOAD_SUFFIX}", payload)

    def save_chunk(self, round_number: int, client_id: str, message: bytes) -> None:
        """Persist one received chunk of `client_id`'s open transfer (named by its digest: a resent chunk
        overwrites itself)."""
        check_identifier(client_id, "Client id")
        name = hashlib.sha256(message).hexdigest()[:32]
        write_atomic(self.round_dir(round_number) / "chunks" / client_id / f"{name}.chunk", message)

    def chunks(self, round_number: int) -> dict[str, list[bytes]]:
        """The persisted chunks of a round's open transfers, client id → chunk messages."""
        folder = self.round_dir(round_number) / "chunks"
        if not folder.is_dir():
            return {}
        return {d.name: [p.read_bytes() for p in sorted(d.glob("*.chunk"))] for d in sorted(folder.iterdir())
                if d.is_dir()}

    def drop_chunks(self, round_number: int, client_id: str | None = None) -> None:
        """Forget the persisted chunks of `client_id`'s transfer (None: of every transfer of the round)."""
        folder = self.round_dir(round_number) / "chunks"
        if client_id is not None:
            check_identifier(client_id, "Client id")
            folder = folder / client_id
        shutil.rmtree(folder, ignore_errors=True)

    def quarantine_update(self, round_number: int, client_id: str, reason: str) -> Path:
        """Move `client_id`'s accepted update of the round out of the merge into `quarantine/`, with the reason
        beside it; returns the kept payload's path (a restarted aggregator no longer loads it)."""
        check_identifier(client_id, "Client id")
        folder = self.round_dir(round_number) / "quarantine"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{client_id}.json", json.dumps({"reason": reason}).encode())
        kept = folder / f"{client_id}{PAYLOAD_SUFFIX}"
        os.replace(self.round_dir(round_number) / "updates" / f"{client_id}{PAYLOAD_SUFFIX}", kept)
        return kept

    def updates(self, round_number: int) -> dict[str, bytes]:
        """Accepted update payloads of a round, client id → bytes."""
        folder = self.round_dir(round_number) / "updates"
        if not folder.is_dir():
            return {}
        return {p.name[: -len(PAYLOAD_SUFFIX)]: p.read_bytes() for p in sorted(folder.glob(f"*{PAYLOAD_SUFFIX}"))}

    def save_globals(self, round_number: int, payloads: dict[int, bytes], factors: dict[str, np.ndarray]) -> None:
        folder = self.round_dir(round_number)
        write_atomic(folder / "global-factors.safetensors", save(factors))
        for rank, payload in payloads.items():
            write_atomic(folder / f"global-r{rank}{PAYLOAD_SUFFIX}", payload)

    def globals(self, round_number: int) -> dict[int, bytes]:
        """Global adapter payloads written at the end of `round_number`, rank → bytes; round 0 holds the server
        state's starting globals (empty without a server optimizer)."""
        folder = self.round_dir(round_number)
        if round_number < 0 or not folder.is_dir():
            return {}
        return {int(p.stem[len("global-r"):]): p.read_bytes() for p in folder.glob(f"global-r*{PAYLOAD_SUFFIX}")}

    def save_server_state(self, round_number: int, state: ServerState) -> None:
        write_atomic(self.round_dir(round_number) / SERVER_STATE_FILE, state.to_bytes())

    def drop_server_state(self, round_number: int) -> None:
        """Remove a round's server state once a later one is saved and the state file points past it."""
        (self.round_dir(round_number) / SERVER_STATE_FILE).unlink(missing_ok=True)

    def server_state(self, round_number: int, form: StateForm) -> ServerState | None:
        """The server's global adapter and optimizer moments after `round_number` (0: the start), if saved."""
        path = self.round_dir(round_number) / SERVER_STATE_FILE
        if not path.is_file():
            return None
        try:
            return ServerState.from_bytes(path.read_bytes(), form)
        except (SafetensorError, KeyError, ValueError) as err:
            raise StateError(f"{path} is unreadable ({err}); restore it from a backup or start a new --state-dir.") from None

    def save_metrics(self, round_number: int, record: dict) -> None:
        write_atomic(self.round_dir(round_number) / "metrics.json", json.dumps(record, indent=1, sort_keys=True).encode())

    def metrics(self, round_number: int) -> dict | None:
        """A closed round's saved metrics record, if there is one."""
        path = self.round_dir(round_number) / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def peft_dir(self, round_number: int) -> Path:
        return self.round_dir(round_number) / "peft"
