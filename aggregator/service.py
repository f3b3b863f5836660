"""The aggregator service: runs rounds over MQTT, validates updates, merges, persists, publishes.

One thread owns all state. paho's network thread only queues messages; this thread handles
them in order and acknowledges each (QoS 1, manual ack) once it has been handled durably, so an
update the aggregator accepted is on disk before the broker forgets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from aggregator.records import RoundRecord
from aggregator.global_model import AGGREGATOR_ID, GlobalModel
from aggregator.privacy import DpSettings, Sampling, require_accountant
from aggregator.round_merge import SAMPLE_CAP, check_strategy
from aggregator.server_state import ServerOptimizer
from aggregator.state import StateDir, StateError
from aggregator.strategies import MergeError, get_strategy
from aggregator.strategies.linalg import BACKEND_ENV, default_backend
from aggregator.traffic import full_fedavg_round_bytes, full_fedavg_upload_bytes, model_parameters
from edge_sdk.protocol import (
    DEFAULT_CHUNK_SIZE, AdapterHeader, ChunkError, ClientStatus, CodecError, DType, FederationConfig, GlobalAdapterRef,
    HeadMode, MessageError, Notice, Reassembler, RoundResult, RoundTask, Topics, TrainingConfig,
    UnsupportedVersionError, decode_adapter, decode_message, encode_message, max_payload_bytes, split_payload,
)
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.manifest import Manifest, bundle_id, read_manifest
from edge_sdk.protocol.ranking import RankPolicy
from edge_sdk.protocol.statistics import FeatureStatistics, PriorStatistics
from edge_sdk.protocol.transport import BrokerSettings, MqttConnection

log = logging.getLogger("fedpeft.aggregator")


@dataclass(frozen=True)
class AggregatorOptions:
    """How the federation runs; `clients_per_round` or `fraction` picks the sample size."""

    federation: str
    rounds: int
    state_dir: Path
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    min_online: int | None = None
    round_timeout: float = 600.0
    strategy: str = "svd-weighted"
    seed: int = 0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    rank_policy: RankPolicy | None = None
    head: HeadMode = "shared"
    dtype: DType = "float32"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    metrics_file: Path | None = None
    server_optimizer: ServerOptimizer | None = None
    """None: each round's merge replaces the global; otherwise the aggregator holds the global and
    steps it with the merged client updates (`aggregator.server_state`)."""
    sample_cap: float = SAMPLE_CAP
    """A client's self-reported sample count weighs at most this many times the round's median."""
    privacy: DpSettings | None = None
    """Clip norm, noise and δ of a private strategy (dp-fedavg); None for the others."""

    def sample_size(self, online: int) -> int:
        wanted = self.clients_per_round if self.clients_per_round else math.ceil((self.fraction or 1.0) * online)
        return max(self.min_clients, min(wanted, online))


def check_head_options(options: AggregatorOptions, manifest: Manifest) -> None:
    """Raise ValueError for head-related training options the bundle or the federation cannot run."""
    tau = options.training.logit_adjustment
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"logit_adjustment must be a finite τ ≥ 0, got {tau}.")
    if tau and manifest.output_bias not in manifest.head_parameters:
        raise ValueError("Logit adjustment needs a bundle that trains the head's output bias: "
                         "export it with --train-head, or set logit adjustment to 0.")
    rounds = options.training.statistics_rounds
    if rounds is not None and not (options.training.feature_statistics and rounds >= 1):
        raise ValueError(f"statistics_rounds (got {rounds}) limits a closed-form head's statistics to rounds 1..N: "
                         "set it to N ≥ 1 together with the closed-form head, or leave it unset.")
    if options.training.prior_calibration:
        if manifest.output_bias not in manifest.head_parameters:
            raise ValueError("Prior calibration moves the head's output bias: export the bundle with --train-head.")
        if options.head != "shared" or options.server_optimizer is None or options.training.feature_statistics:
            raise ValueError("Prior calibration steps the shared head the server holds: run it with the head shared, "
                             "a server optimizer (--server-opt) and no closed-form head.")
        if get_strategy(options.strategy).private:
            raise ValueError(f"{options.strategy} cannot calibrate: label counts would leave the devices without noise.")
    if not options.training.feature_statistics:
        return
    if manifest.feature_width is None or manifest.output_bias is None:
        raise ValueError("A closed-form head needs a bundle with a trainable output layer and its features output: "
                         "re-export it with this fedpeft-export and --train-head.")
    if options.head != "shared" or options.server_optimizer is None:
        raise ValueError("A closed-form head is solved by the server for everyone: run it with the head shared "
                         "and a server optimizer (--server-opt).")


def check_privacy_options(options: AggregatorOptions) -> None:
    """Raise ValueError unless privacy settings come exactly with a private strategy and what it needs."""
    private = get_strategy(options.strategy).private
    if private and options.privacy is None:
        raise ValueError(f"{options.strategy} needs its clip norm and noise multiplier (--dp-clip, --dp-noise).")
    if not private and options.privacy is not None:
        raise ValueError(f"Strategy {options.strategy} adds no noise; the DP settings belong to dp-fedavg.")
    if private and options.server_optimizer is None:
        raise ValueError(f"{options.strategy} clips each update against the global it was sent, which the server "
                         "holds: give a server optimizer (--server-opt sgd --server-lr 1 is DP-FedAvg's own step).")
    if private and options.training.feature_statistics:
        raise ValueError(f"{options.strategy} cannot take a closed-form head: its feature statistics would leave "
                         "the devices without noise.")
    if private:
        require_accountant()


def _sent_as_asked(what: str, sent: FeatureStatistics | PriorStatistics | None, wanted: bool, why: str, when: str,
                   declared: int) -> str | None:
    """Why statistics an update carries (or lacks) are refused, or None."""
    if sent is None:
        return f"{what} missing: {why}" if wanted else None
    if not wanted:
        return f"{what} sent, but this federation does not ask for them{' ' + when if when else ''}"
    if sent.samples > declared:
        return f"{what} over {sent.samples} examples, more than the {declared} the update declares"
    return None


MAX_TOLD = 10_000
"""Distinct (round, sender, reason) rejections remembered so as to be logged and notified only once."""


@dataclass
class _Round:
    """What the open round has gathered so far (memory mirror of the state dir)."""

    task: RoundTask
    accepted: dict[str, tuple[AdapterHeader, Adapter]] = field(default_factory=dict)
    accepted_bytes: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    rejections: int = 0
    bytes_in: int = 0
    opened: float = field(default_factory=time.monotonic)


class Aggregator:
    """Runs `options.rounds` rounds of a federation for the bundle at `bundle`."""

    def __init__(self, bundle: str | Path, broker: BrokerSettings, options: AggregatorOptions,
                 on_round: Callable[[RoundRecord], None] | None = None) -> None:
        """`on_round(record)` runs after each round is persisted, before the next opens (e.g. to evaluate)."""
        if options.min_clients < 1 or options.rounds < 1:
            raise ValueError("rounds and min_clients must be at least 1.")
        self.bundle, self.options, self.on_round = Path(bundle), options, on_round
        self.manifest = read_manifest(self.bundle)
        check_strategy(options.strategy, self.manifest)
        if options.training.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be ≥ 0, got {options.training.proximal_mu}.")
        if options.training.proximal_mu and not self.manifest.lora.proximal:
            raise ValueError("proximal_mu > 0 needs a bundle whose graphs carry FedProx's term: "
                             "export it with `fedpeft-export --proximal`.")
        if not (math.isfinite(options.sample_cap) and options.sample_cap >= 1):
            raise ValueError(f"sample_cap must be a finite number ≥ 1, got {options.sample_cap}.")
        check_head_options(options, self.manifest)
        check_privacy_options(options)
        self.bundle_id = bundle_id(self.bundle)
        self.topics = Topics(options.federation)
        self.store = StateDir(options.state_dir)
        optimizer = options.server_optimizer
        self.state = self.store.load(options.federation, self.bundle_id, options.strategy,
                                     asdict(optimizer) if optimizer else None)
        self.globals = GlobalModel(self.bundle, self.manifest, self.store, options.federation, options.strategy,
                                   options.head, optimizer, options.sample_cap, options.training.feature_statistics,
                                   options.privacy)
        self.max_update_bytes = max_payload_bytes(self.manifest)
        self.online: dict[str, ClientStatus] = {}
        self.records: list[RoundRecord] = []
        self.rejections_total = 0
        self._told: set[tuple[int | None, str, str]] = set()
        self._inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.dropped_qos0 = 0
        self._reassembler = Reassembler(self.max_update_bytes)
        self._round: _Round | None = None
        self._published_chunks: dict[int, int] = {}
        self._stop = False
        self.connection = MqttConnection(
            f"fedpeft-{options.federation}-{AGGREGATOR_ID}", broker, self._receive,
            subscriptions=[self.topics.all_statuses, self.topics.all_updates], manual_ack=True,
        )

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        """On the network thread: queue a message for the service thread. The protocol sends everything at QoS 1,
        which the broker paces (its max_inflight_messages, acknowledged only once handled); a QoS 0 message has
        no such pacing, so a flood of them could fill memory faster than it drains: dropped here, counted."""
        if message.qos == 0:
            self.dropped_qos0 += 1
            if self.dropped_qos0 in (1, 1000, 100_000):
                log.warning("dropped %d QoS 0 messages (the protocol uses QoS 1; last on %s)", self.dropped_qos0,
                            message.topic)
            return
        self._inbox.put(message)

    def config(self) -> FederationConfig:
        policy = self.options.rank_policy or RankPolicy.balanced(max(self.manifest.ranks), 4 * 2**30, 4.0, 1000)
        return FederationConfig(
            federation=self.options.federation, bundle_id=self.bundle_id, ranks=self.manifest.ranks,
            rank_policy=policy, head=self.options.head, dtype=self.options.dtype,
            chunk_size=self.options.chunk_size, training=self.options.training, rounds=self.options.rounds,
        )

    def run(self, connect_timeout: float = 30.0) -> list[RoundRecord]:
        """Run (or resume) the federation to its last round; returns the per-round metrics."""
        log.info("merge arithmetic on %s (set %s to choose)", default_backend().name, BACKEND_ENV)
        self.connection.start(connect_timeout)
        try:
            self.connection.publish_all([(self.topics.config, encode_message(self.config()), True)], 30)
            self.globals.start(self.state.round)
            self._announce_missed()
            while self.state.round <= self.options.rounds and not self._stop:
                self._open_or_resume()
                self._collect()
                if self._round is not None and not self._stop:
                    self._close()
            if not self._stop:
                finished = RoundTask(round=self.state.round, attempt=0, deadline=time.time(), sampled=[], seed=0,
                                     globals=self._task_refs(), finished=True)
                messages = self._global_messages(self.state.round - 1)
                self.connection.publish_all([*messages, (self.topics.task, encode_message(finished), True)], 60)
                log.info("federation %s finished after %d rounds", self.options.federation, self.options.rounds)
        finally:
            self.connection.stop()
        return self.records

    def stop(self) -> None:
        """Ask the run loop to return after the message it is handling (state stays resumable)."""
        self._stop = True

    # Round lifecycle -------------------------------------------------------------------------

    def _open_or_resume(self) -> None:
        state = self.state
        if state.task is not None and state.task.round == state.round:
            task = state.task
            self._round = _Round(task)
            self._load_accepted()
            self._replay_chunks()
            if task.deadline < time.time():
                task = replace(task, deadline=time.time() + self.options.round_timeout)
                self._round.task = task
            log.info("resuming round %d with %d accepted updates", state.round, len(self._round.accepted))
            self._publish_task(task)
            return
        first = self.state.round == 1
        self._wait_for_clients(max(self.options.min_clients, (self.options.min_online or 0) if first else 0))
        if self._stop:
            return
        self._round = _Round(self._new_task(attempt=0, keep=[]))
        self._publish_task(self._round.task)

    def _new_task(self, attempt: int, keep: list[str], population: int | None = None) -> RoundTask:
        """Sample the round's clients (keeping `keep`); `population`: the online count of the first draw."""
        candidates = sorted(set(self.online) - set(keep))
        count = max(0, self.options.sample_size(len(self.online)) - len(keep))
        rng = np.random.default_rng([self.options.seed, self.state.round, attempt])
        picked = sorted(rng.choice(candidates, size=min(count, len(candidates)), replace=False).tolist()) if count else []
        return RoundTask(round=self.state.round, attempt=attempt, deadline=time.time() + self.options.round_timeout,
                         sampled=sorted(keep + picked), seed=int(rng.integers(2**31)), globals=self._task_refs(),
                         population=len(self.online) if population is None else population)

    def _task_refs(self) -> dict[str, GlobalAdapterRef]:
        """Per tier, the global the open round starts from (after the last round: the federation's final one)."""
        return {str(rank): GlobalAdapterRef(**ref) for rank, ref in self._global_refs().items()}

    def _global_refs(self) -> dict[int, dict]:
        payloads = self.store.globals(self.state.round - 1)
        return {
            rank: {"sha256": hashlib.sha256(p).hexdigest(), "num_bytes": len(p),
                   "chunks": len(split_payload(p, self.options.chunk_size))}
            for rank, p in sorted(payloads.items())
        }

    def _publish_task(self, task: RoundTask) -> None:
        """Retained global chunks per tier first, then the task that points at them; persisted before publishing."""
        self.state.task = task
        self.store.save(self.state)
        messages = [*self._global_messages(task.round - 1), (self.topics.task, encode_message(task), True)]
        self.connection.publish_all(messages, timeout=60)
        log.info("round %d (attempt %d): sampled %s, deadline in %.0f s", task.round, task.attempt,
                 ", ".join(task.sampled), task.deadline - time.time())

    def _collect(self) -> None:
        """Handle messages until the quorum is in and no sampled client that is still online owes an update,
        or the deadline passed with a quorum. A sampled device that went offline is a dropout at once."""
        while not self._stop and self._round is not None:
            current = self._round
            quorum = len(current.accepted) >= self.options.min_clients
            owing = set(current.task.sampled) - set(current.accepted)
            if quorum and not owing & set(self.online):
                return
            if time.time() >= current.task.deadline:
                for sender, reason in self._reassembler.expire(0).items():
                    self.store.drop_chunks(current.task.round, sender)
                    self._reject(sender, f"update incomplete at the deadline ({reason})", None)
                if quorum:
                    return
                log.warning("round %d: %d of %d required updates by the deadline; sampling more clients",
                            current.task.round, len(current.accepted), self.options.min_clients)
                self._wait_for_clients(len(current.accepted) + 1)
                current.task = self._new_task(current.task.attempt + 1, keep=sorted(current.accepted),
                                              population=current.task.population)
                self._publish_task(current.task)
                continue
            self._handle_next(timeout=min(0.5, max(0.01, current.task.deadline - time.time())))

    def _close(self) -> None:
        """Merge, persist the round (globals, peft folder, record, state), then announce it."""
        current = self._round
        assert current is not None
        closing = time.monotonic()
        task = current.task
        sampling = Sampling(max(task.population or 0, len(task.sampled)), len(task.sampled), task.attempt > 0)
        payloads, merge_seconds, spent = self._merge(current, sampling)
        self.store.drop_chunks(current.task.round)
        record = self._record(current, payloads, merge_seconds)
        if spent is not None:
            record.dp_epsilon, record.dp_delta = spent
        self.store.save_metrics(record.round, record.to_dict())
        self.state.round, self.state.task = record.round + 1, None
        self.store.save(self.state)
        if self.options.server_optimizer is not None:
            self.store.drop_server_state(record.round - 1)
        self._round = None
        self.connection.publish(self.topics.task, b"", retain=True)
        record.close_seconds = round(time.monotonic() - closing, 4)
        self._announce(record)
        self.state.announced = record.round
        self.store.save(self.state)
        log.info("round %d closed: %d participants, %d dropouts, %d rejected, merge %.0f ms, in %.1f MB / out %.1f MB",
                 record.round, len(record.participants), len(record.dropouts), record.rejected,
                 1000 * merge_seconds, record.bytes_in / 1e6, record.bytes_out / 1e6)

    def _merge(self, current: _Round, sampling: Sampling) -> tuple[dict[int, bytes], float, tuple | None]:
        """The round's merge. An update whose presence makes it fail (however it passed validation) is
        quarantined: moved out of the round's updates with the reason, refused to its sender, and the round
        merges without it, so no update can crash the aggregator into a restart loop."""
        round_number = current.task.round
        try:
            return self.globals.close(round_number, current.accepted, sampling)
        except (MergeError, StateError, OSError):
            raise
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"[:300]
            log.error("round %d: the merge failed (%s); looking for the update that breaks it", round_number, failure)
            for culprit in sorted(current.accepted):
                rest = {cid: update for cid, update in current.accepted.items() if cid != culprit}
                if not rest:
                    break
                try:
                    merged = self.globals.close(round_number, rest, sampling)
                except Exception:
                    continue
                reason = f"its update made the merge fail ({failure}); quarantined"
                self.store.quarantine_update(round_number, culprit, reason)
                current.accepted = rest
                current.accepted_bytes.pop(culprit, None)
                self._reject(culprit, reason, round_number)
                return merged
            raise StateError(f"round {round_number}: the merge fails ({failure}) with any single update left out; "
                             "report this as a bug with the round's folder.") from err

    def _global_messages(self, round_number: int) -> list[tuple[str, bytes, bool]]:
        """Retained chunks of every tier's global after `round_number`, and empty retained messages that clear
        the chunk topics a longer earlier global left behind."""
        messages = []
        for rank, payload in sorted(self.store.globals(round_number).items()):
            chunks = split_payload(payload, self.options.chunk_size)
            messages += [(self.topics.global_chunk(rank, i), c, True) for i, c in enumerate(chunks)]
            stale = range(len(chunks), self._published_chunks.get(rank, 0))
            messages += [(self.topics.global_chunk(rank, i), b"", True) for i in stale]
            self._published_chunks[rank] = len(chunks)
        return messages

    def _announce_missed(self) -> None:
        """Announce the last closed round again if a kill came between advancing the state and announcing it."""
        last = self.state.round - 1
        if self.state.announced is None or self.state.announced >= last:
            return
        saved = self.store.metrics(last)
        if saved is None:
            raise StateError(f"{self.store.root}: round {last} closed but its metrics.json is missing; restore it "
                             "from a backup or start a new --state-dir.")
        log.info("announcing round %d, closed before the last stop without its announcement", last)
        self._announce(RoundRecord.from_dict(saved))
        self.state.announced = last
        self.store.save(self.state)

    def _announce(self, record: RoundRecord) -> None:
        """Keep the record, append it to the metrics file, publish the RoundResult, call `on_round`."""
        self.records.append(record)
        if self.options.metrics_file:
            with open(self.options.metrics_file, "a") as handle:
                handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        result = RoundResult(round=record.round, participants=record.participants, dropouts=record.dropouts,
                             rejected=record.rejected_reasons, metrics=record.numbers())
        self.connection.publish(self.topics.result, encode_message(result), retain=True)
        if self.on_round is not None:
            self.on_round(record)

    def _record(self, current: _Round, payloads: dict[int, bytes], merge_seconds: float) -> RoundRecord:
        participants = sorted(current.accepted)
        headers = {cid: current.accepted[cid][0] for cid in participants}
        down = sum(len(payloads[self.online[c].rank]) if c in self.online and self.online[c].rank in payloads
                   else len(payloads[max(payloads)]) for c in participants)
        parameters = model_parameters(self.manifest)
        return RoundRecord(
            round=current.task.round, attempts=current.task.attempt + 1, strategy=self.options.strategy,
            sampled=current.task.sampled, participants=participants,
            dropouts=sorted(set(current.task.sampled) - set(participants)),
            rejected=current.rejections, rejected_reasons=dict(current.rejected),
            ranks={cid: current.accepted[cid][1].rank for cid in participants},
            samples=sum(h.num_samples for h in headers.values()),
            bytes_in=current.bytes_in, bytes_accepted=sum(current.accepted_bytes.values()), bytes_out=down,
            full_fedavg_bytes=full_fedavg_round_bytes(parameters, len(participants)),
            full_fedavg_bytes_up=full_fedavg_upload_bytes(parameters, len(participants)),
            merge_seconds=round(merge_seconds, 4), round_seconds=round(time.monotonic() - current.opened, 3),
            client_samples={cid: h.num_samples for cid, h in headers.items()},
            client_metrics={cid: dict(h.metrics) for cid, h in headers.items()},
        )

    def _load_accepted(self) -> None:
        current = self._round
        assert current is not None
        for cid, payload in self.store.updates(current.task.round).items():
            try:
                current.accepted[cid] = decode_adapter(payload, self.manifest, self.max_update_bytes)
                current.accepted_bytes[cid] = len(payload)
            except CodecError as err:
                log.error("state dir: dropping unreadable update of %s: %s", cid, err)

    def _wait_for_clients(self, needed: int) -> None:
        """Handle messages until `needed` clients are online (those already accepted count too)."""
        last_log = 0.0
        while len(set(self.online) | set(self._round.accepted if self._round else ())) < needed and not self._stop:
            if time.monotonic() - last_log > 10:
                log.info("waiting for clients: %d online, %d needed", len(self.online), needed)
                last_log = time.monotonic()
            self._handle_next(timeout=0.5)

    # Messages --------------------------------------------------------------------------------

    def _handle_next(self, timeout: float) -> None:
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            sender = self.topics.client_of(message.topic)
            if sender is None:
                log.debug("ignoring message on %s", message.topic)
            elif message.topic == self.topics.status(sender):
                self._on_status(sender, message.payload)
            else:
                self._on_update_chunk(sender, message.payload)
        except Exception:
            log.exception("unexpected error handling a message on %s; dropped", message.topic)
        finally:
            self.connection.ack(message)

    def _on_status(self, sender: str, payload: bytes) -> None:
        if not payload:
            self.online.pop(sender, None)
            return
        try:
            status = decode_message(payload, ClientStatus)
        except UnsupportedVersionError as err:
            self._notice(sender, "refused", str(err), None)
            return
        except MessageError as err:
            log.warning("bad status from %s dropped: %s", sender, err)
            return
        if status.client_id != sender:
            log.warning("status on %s's topic names %s; dropped", sender, status.client_id)
            return
        if status.state == "offline":
            if self.online.pop(sender, None) is not None:
                log.info("client %s went offline", sender)
            return
        if status.rank not in self.manifest.ranks:
            self._notice(sender, "refused", f"rank {status.rank} is not a tier of this bundle {self.manifest.ranks}", None)
            return
        if sender not in self.online:
            log.info("client %s online at tier r=%s", sender, status.rank)
        self.online[sender] = status

    def _on_update_chunk(self, sender: str, payload: bytes, persist: bool = True) -> None:
        """Reassemble `sender`'s chunks; only senders sampled for the open round (and not yet accepted)
        may hold a transfer open, so memory stays bounded by the round's sample × the largest payload.

        A chunk of an unfinished transfer is written to the state dir before it is acknowledged
        (`persist`; False when replaying those files after a restart), so a kill mid-transfer loses
        nothing the broker already forgot.
        """
        current = self._round
        if current is None or sender not in current.task.sampled:
            self._reject(sender, "not sampled for this round", None)
            return
        if sender in current.accepted:
            self._reject(sender, "duplicate update for this round", None)
            return
        round_number = current.task.round
        current.bytes_in += len(payload)
        try:
            complete, failed = self._reassembler.add(sender, payload)
        except ChunkError as err:
            self.store.drop_chunks(round_number, sender)
            self._reject(sender, f"bad chunk: {err}", None)
            return
        if failed:
            self.store.drop_chunks(round_number, sender)
            self._reject(sender, failed, None)
        if complete is None:
            if persist:
                self.store.save_chunk(round_number, sender, payload)
            return
        self._on_update(sender, complete)
        self.store.drop_chunks(round_number, sender)

    def _replay_chunks(self) -> None:
        """After a restart: feed the open round's persisted chunks back into their transfers."""
        current = self._round
        assert current is not None
        for sender, messages in self.store.chunks(current.task.round).items():
            for message in messages:
                self._on_update_chunk(sender, message, persist=False)
            if sender in current.accepted or sender not in current.task.sampled:
                self.store.drop_chunks(current.task.round, sender)

    def _on_update(self, sender: str, payload: bytes) -> None:
        current = self._round
        try:
            header, adapter = decode_adapter(payload, self.manifest, self.max_update_bytes)
        except CodecError as err:
            self._reject(sender, f"{type(err).__name__}: {err}", None)
            return
        reason = self._refusal(sender, header, current) or self._statistics_refusal(header, adapter)
        if reason is not None:
            self._reject(sender, reason, header.round)
            return
        assert current is not None
        self.store.save_update(current.task.round, sender, payload)
        current.accepted[sender] = (header, adapter)
        current.accepted_bytes[sender] = len(payload)
        log.info("round %d: accepted %s (r=%d, n=%d, %d bytes) — %d/%d", current.task.round, sender, header.rank,
                 header.num_samples, len(payload), len(current.accepted), len(current.task.sampled))

    def _refusal(self, sender: str, header: AdapterHeader, current: _Round | None) -> str | None:
        if header.client_id != sender:
            return f"forged sender: payload claims {header.client_id!r} but arrived on {sender!r}'s topic"
        if header.federation != self.options.federation:
            return f"foreign federation {header.federation!r}"
        if current is None or header.round < current.task.round:
            return f"late update for round {header.round}"
        if header.round > current.task.round:
            return f"update for future round {header.round} (open round is {current.task.round})"
        if sender in current.accepted:
            return "duplicate update for this round"
        if sender not in current.task.sampled:
            return "not sampled for this round"
        if header.num_samples < 1:
            return "num_samples must be at least 1"
        announced = self.online.get(sender)
        if announced is not None and header.rank != announced.rank:
            return f"rank {header.rank} is not the tier r={announced.rank} the client announced"
        if header.head != (self.options.head == "shared" and bool(self.manifest.head_parameters)):
            return f"head {'sent' if header.head else 'missing'} but the federation keeps it {self.options.head}"
        return None

    def _statistics_refusal(self, header: AdapterHeader, adapter: Adapter) -> str | None:
        """Feature and prior statistics are sent exactly when asked for, over no more examples than the device has."""
        return (_sent_as_asked("feature statistics", adapter.statistics, self.options.training.sends_statistics(
                    header.round), "this federation asks for them", "in this round", header.num_samples)
                or _sent_as_asked("prior statistics", adapter.prior, self.options.training.prior_calibration,
                                  "this federation calibrates the output bias", "", header.num_samples))

    def _reject(self, sender: str, reason: str, round_number: int | None) -> None:
        """Count every rejection; log it and notify the sender once per sender and reason while the round
        stays the same, so a flood of refused chunks costs counters only, not a log line and a notice each."""
        self.rejections_total += 1
        key = (self._round.task.round if self._round is not None else None, sender, reason)
        if self._round is not None:
            self._round.rejected[sender] = reason
            self._round.rejections += 1
        if key in self._told:
            return
        if len(self._told) >= MAX_TOLD:
            self._told.clear()
        self._told.add(key)
        log.warning("update from %s rejected: %s", sender, reason)
        self._notice(sender, "rejected", reason, round_number)

    def _notice(self, client: str, verdict: str, reason: str, round_number: int | None) -> None:
        self.connection.publish(self.topics.notice(client), encode_message(
            Notice(client_id=client, verdict=verdict, reason=reason, round=round_number)))
