"""The device's federation runtime: join, profile, choose a tier, train each sampled round, upload.

Embed it in an app:

    client = FederatedClient(bundle, BrokerSettings.from_url("mqtt://broker:1883"), "my-fed", data=examples)
    client.run()            # until the federation finishes or client.stop() is called

`data` is a `Dataset` or a callable round → Dataset, so the app can supply fresh local data each
round (round 0 is asked once, for profiling the device and choosing its tier). `available`
lets the app sit a round out (battery low, device in use): the device then shows as offline to
the aggregator until that round is over. The client never uploads twice for a round: it records
the round in its state file before publishing, and after a restart it resumes a round whose task
is still open. Many clients in one process share opened tiers through a `TrainerPool`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edge_sdk.data import Dataset, Example
from edge_sdk.datasets import check_labels
from edge_sdk.files import write_atomic
from edge_sdk.predict import Predictor
from edge_sdk.profile import profile_device
from edge_sdk.protocol import (
    AdapterHeader, ChunkError, ClientStatus, CodecError, FederationConfig, MessageError, Notice, Reassembler,
    RoundTask, Topics, UnsupportedVersionError, check_identifier, decode_adapter, decode_message, encode_adapter,
    encode_message, max_payload_bytes, split_payload,
)
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.codec import MAX_METRIC_NAME_CHARS
from edge_sdk.protocol.manifest import bundle_id, read_manifest
from edge_sdk.protocol.ranking import DeviceProfile, RankChoice
from edge_sdk.protocol.transport import BrokerSettings, MqttConnection
from edge_sdk.rank import choose_rank
from edge_sdk.trainer import EvalReport
from edge_sdk.trainer_pool import TrainerPool

log = logging.getLogger("fedpeft.client")
GLOBAL_SENDER = "aggregator"
"""The one sender of global adapter chunks, as the reassembler keys transfers."""
DataSource = Dataset | Callable[[int], Dataset]


class ClientRefusedError(RuntimeError):
    """The aggregator refused this client (protocol version, tier or bundle mismatch)."""


@dataclass(frozen=True)
class RoundReport:
    """What this device did in one round."""

    round: int
    rank: int
    samples: int
    steps: int
    train_seconds: float
    train_cpu_seconds: float
    train_loss: float
    upload_bytes: int
    evaluation: EvalReport | None


MAX_APP_METRICS = 16
"""Numbers the app's evaluation hook may add to an upload (the header holds 64 in all)."""


PRIOR_SAMPLE = 32
"""Examples a device scores each round for prior calibration: two batches, ~a tenth of a round's compute
(the server pools the sums over rounds, so a sample serves as well as the whole local set)."""


def prior_sample(examples: list[Example], seed: int) -> list[Example]:
    """At most PRIOR_SAMPLE of `examples`, drawn with the round's seed."""
    if len(examples) <= PRIOR_SAMPLE:
        return examples
    picked = np.random.default_rng(seed).choice(len(examples), PRIOR_SAMPLE, replace=False)
    return [examples[i] for i in sorted(picked)]


def app_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """The app's evaluation numbers as header metrics `app_<name>`; raises ValueError for what the aggregator
    would refuse (too many, names too long or empty, values not finite numbers)."""
    if not isinstance(values, Mapping) or len(values) > MAX_APP_METRICS:
        raise ValueError(f"The evaluate hook must return a mapping of at most {MAX_APP_METRICS} names to numbers.")
    out = {}
    for name, value in values.items():
        key = f"app_{name}"
        if not isinstance(name, str) or not name or len(key) > MAX_METRIC_NAME_CHARS:
            raise ValueError(f"Metric name {name!r}: give 1 to {MAX_METRIC_NAME_CHARS - 4} characters.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Metric {name!r} must be a finite number, got {value!r}.")
        out[key] = float(value)
    return out


class FederatedClient:
    """One device in a federation, speaking the FedPEFT protocol through an MQTT broker.

    The device picks its tier by the federation's rank formula from its measured profile; `rank`
    fixes the tier instead (an exported tier that fits its memory), the profile still measured and
    reported. Hooks for the host app: `on_progress(round, step, loss)` during training,
    `on_global(round, adapter)` when the global adapter a round starts from arrives, and
    `evaluate(predictor)` after local training, with a `Predictor` on the trained adapter; the
    numbers it returns travel to the aggregator in the upload's header as `app_<name>`. After the
    federation, `personalize(steps)` fine-tunes the final global on the device's own data into a
    personal adapter that stays on the device.
    """

    def __init__(
        self,
        bundle: str | Path,
        broker: BrokerSettings,
        federation: str,
        data: DataSource,
        *,
        client_id: str | None = None,
        eval_data: Dataset | None = None,
        preset: str | None = None,
        threads: int | None = None,
        device: str = "cpu",
        state_dir: str | Path | None = None,
        on_progress: Callable[[int, int, float], None] | None = None,
        available: Callable[[int], bool] | None = None,
        trainers: TrainerPool | None = None,
        rank: int | None = None,
        on_global: Callable[[int, Adapter], None] | None = None,
        evaluate: Callable[[Predictor], Mapping[str, float]] | None = None,
    ) -> None:
        self.bundle, self.federation = Path(bundle), check_identifier(federation, "Federation id")
        self.manifest = read_manifest(self.bundle)
        self.data, self.eval_data = data, (list(eval_data) if eval_data is not None else None)
        self.preset, self.threads, self.device, self.on_progress = preset, threads, device, on_progress
        self.available, self.trainers = available, trainers
        self.state_dir = Path(state_dir or Path.home() / ".cache" / "fedpeft" / "clients" / federation)
        self.client_id = check_identifier(client_id or self._stored_client_id(), "Client id")
        self.topics = Topics(federation)
        self.profile: DeviceProfile | None = None
        self.rank_choice: RankChoice | None = None
        self.rank: int | None = None
        self.fixed_rank, self.on_global, self.app_evaluate = rank, on_global, evaluate
        self._trainable: dict | None = None
        self.global_adapter: Adapter | None = None
        """The latest global adapter of this device's tier: a round's starting point, or the federation's final one."""
        self.personal_adapter: Adapter | None = None
        self._final_received = False
        self.config: FederationConfig | None = None
        self._task: RoundTask | None = None
        self._globals = Reassembler(max_payload_bytes(self.manifest))
        self._global: bytes | None = None
        self._refused: str | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._offline = encode_message(ClientStatus(client_id=self.client_id, state="offline"))
        self.connection = MqttConnection(
            f"fedpeft-{federation}-{self.client_id}", broker, self._on_message,
            subscriptions=[self.topics.config, self.topics.task, self.topics.notice(self.client_id)],
            will=(self.topics.status(self.client_id), self._offline), on_connect=self._announce,
        )
        self._status: bytes | None = None

    # Public API ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Check the data against the bundle, connect, read the federation config, profile this device, choose a
        tier and join. Labels the bundle's head has no class for raise DataError before anything is sent."""
        examples = self._round_data(0)
        if self.manifest.task != "causal-lm":
            check_labels(examples, len(self.manifest.labels), f"{self.client_id}'s data")
        self.connection.start(timeout)
        config = self._wait(lambda: self.config, timeout, "the federation config (is the aggregator running?)")
        if config.bundle_id != bundle_id(self.bundle):
            raise ClientRefusedError(
                f"The federation trains bundle {config.bundle_id}, this device has {bundle_id(self.bundle)}: "
                "install the federation's bundle."
            )
        self.profile, prober = profile_device(
            self.bundle, examples, batch_size=config.training.batch_size, preset=self.preset,
            threads=self.threads, device=self.device,
        )
        self.rank_choice = choose_rank(self.profile, config.rank_policy, config.ranks, prober)
        rank = self.rank_choice.rank if self.fixed_rank is None else self._checked_fixed_rank(config)
        head = "shared" if config.head == "shared" else "local"
        if self.trainers is None:
            self.trainers = TrainerPool(self.bundle, device=self.device, head=head)
        elif self.trainers.head != head:
            raise ValueError(f"The federation keeps the head {config.head}; "
                             f"the trainer pool was made for head={self.trainers.head}.")
        self.rank = rank
        self._status = encode_message(ClientStatus(
            client_id=self.client_id, state="online", rank=rank, profile=self.profile, rank_choice=self.rank_choice,
        ))
        self._announce()
        log.info("%s joined %s at tier r=%d (formula r=%d)", self.client_id, self.federation, rank,
                 self.rank_choice.raw_rank)

    def personalize(self, steps: int, *, data: Dataset | None = None, lr: float | None = None,
                    batch_size: int | None = None, seed: int = 0) -> Adapter:
        """Fine-tune `steps` batches of the device's own data (default: its round-0 data) from the latest global
        adapter, at the federation's local learning rate and batch size unless given; the result is kept as
        `personal_adapter`, never uploaded. Load it into a `Predictor` or `LanguageTrainer` to use it."""
        if self.global_adapter is None or self.rank is None or self.trainers is None or self.config is None:
            raise RuntimeError(f"{self.client_id} has no global adapter yet: run the federation (run()) first.")
        training = self.config.training
        examples = list(data) if data is not None else self._round_data(0)
        with self.trainers.lease(self.rank, self.profile.threads if self.profile else None) as trainer:
            trainer.load_state(self._trainable, self.global_adapter)
            trainer.fit(examples, steps=steps, batch_size=batch_size or training.batch_size,
                        lr=training.lr if lr is None else lr, seed=seed)
            self.personal_adapter = trainer.get_adapter()
        return self.personal_adapter

    def _checked_fixed_rank(self, config: FederationConfig) -> int:
        """The tier given to the constructor, if the federation has it and this device's memory holds it."""
        assert self.fixed_rank is not None and self.rank_choice is not None
        if self.fixed_rank not in config.ranks:
            raise ClientRefusedError(f"Tier r={self.fixed_rank} is not one of the federation's tiers {config.ranks}: "
                                     "pass one of those, or no rank to let the device choose.")
        if self.fixed_rank in self.rank_choice.too_big:
            raise ClientRefusedError(f"Tier r={self.fixed_rank} does not fit this device's memory "
                                     f"({self.rank_choice.memory_available_bytes / 2**20:.0f} MiB available): "
                                     "pass a smaller rank, or none.")
        return self.fixed_rank

    def run(self, max_rounds: int | None = None) -> list[RoundReport]:
        """Take part in rounds until the federation finishes, `stop()` is called, or `max_rounds` were done."""
        if self.rank is None:
            self.start()
        reports: list[RoundReport] = []
        try:
            while max_rounds is None or len(reports) < max_rounds:
                report = self.run_round()
                if report is None:
                    break
                reports.append(report)
        finally:
            self.close()
        return reports

    def run_round(self, timeout: float | None = None) -> RoundReport | None:
        """Wait for the next round that samples this device, train and upload; None when finished or stopped."""
        if self.rank is None:
            self.start()
        while True:
            task = self._wait(self._next_task, timeout, "a round task", allow_stop=True)
            if task is None:
                return None
            if task.finished:
                self._receive_final(task)
                return None
            if self.available is None or self.available(task.round):
                return self._train_and_upload(task)
            self._sit_out(task.round)

    def stop(self) -> None:
        """Finish gracefully: training stops between steps and `run` returns."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Mark this device offline and disconnect."""
        if self.connection.connected:
            try:
                self.connection.publish_all([(self.topics.status(self.client_id), self._offline, True)], timeout=5)
            except ConnectionError:
                log.warning("%s: could not publish the offline status", self.client_id)
        self.connection.stop()

    # Rounds ----------------------------------------------------------------------------------

    def _next_task(self) -> RoundTask | None:
        task = self._task
        if task is None:
            return None
        if task.finished:
            return task
        if self.client_id in task.sampled and task.round > self._last_uploaded() and time.time() < task.deadline:
            return task
        return None

    def _sit_out(self, round_number: int) -> None:
        """Show as offline (so the round need not wait for this device) until round `round_number` is over."""
        log.info("%s: not available for round %d", self.client_id, round_number)
        self.connection.publish_all([(self.topics.status(self.client_id), self._offline, True)], timeout=30)
        self._wait(lambda: True if self._task is None or self._task.round != round_number else None, None,
                   f"the end of round {round_number}", allow_stop=True)
        self._announce()

    def _train_and_upload(self, task: RoundTask) -> RoundReport:
        assert self.rank is not None and self.trainers is not None and self.config is not None
        assert self.profile is not None
        rank = self.rank
        ref = task.global_for(rank)
        received = None
        if ref is not None:
            _, received = decode_adapter(self._download(ref.sha256), self.manifest)
            self.global_adapter = received
            if self.on_global is not None:
                self.on_global(task.round, received)
        training = self.config.training
        examples = self._round_data(task.round)
        seed = (task.seed + zlib.crc32(self.client_id.encode())) % 2**31
        with self.trainers.lease(rank, self.profile.threads) as trainer:
            trainer.load_state(self._trainable, received)
            statistics = trainer.feature_statistics(examples) if training.sends_statistics(task.round) else None
            prior = (trainer.prior_statistics(prior_sample(examples, seed)) if training.prior_calibration
                     else None)
            report = trainer.fit(
                examples, epochs=training.epochs, steps=training.steps, batch_size=training.batch_size, lr=training.lr,
                schedule=training.schedule, warmup_steps=training.warmup_steps, seed=seed,
                proximal_mu=training.proximal_mu, logit_adjustment=training.logit_adjustment,
                on_step=(lambda step, loss: self.on_progress(task.round, step, loss)) if self.on_progress else None,
                should_stop=self._stop.is_set,
            )
            evaluation = trainer.evaluate(self.eval_data) if self.eval_data else None
            adapter, self._trainable = trainer.get_adapter(), trainer.state()
        adapter.statistics, adapter.prior = statistics, prior
        metrics = {"train_loss": report.mean_loss, "train_seconds": report.wall_seconds,
                   "train_cpu_seconds": report.cpu_seconds}
        if evaluation is not None:
            scores = {"eval_accuracy": evaluation.accuracy, "eval_macro_f1": evaluation.macro_f1,
                      "eval_loss": evaluation.loss}
            metrics.update({k: v for k, v in scores.items() if math.isfinite(v)})
        if self.app_evaluate is not None:
            metrics.update(app_metrics(self.app_evaluate(Predictor(self.bundle, adapter, threads=self.profile.threads))))
        payload = encode_adapter(adapter, AdapterHeader(
            federation=self.federation, round=task.round, client_id=self.client_id, rank=rank,
            num_samples=len(examples), dtype=self.config.dtype, metrics=metrics,
        ))
        self._record_upload(task.round)
        chunks = split_payload(payload, self.config.chunk_size)
        self.connection.publish_all([(self.topics.update(self.client_id), c, False) for c in chunks], timeout=300)
        log.info("%s: round %d uploaded (%d steps, loss %.3f, %d bytes)", self.client_id, task.round, report.steps,
                 report.mean_loss, len(payload))
        return RoundReport(task.round, rank, len(examples), report.steps, report.wall_seconds, report.cpu_seconds,
                           report.mean_loss, len(payload), evaluation)

    def _receive_final(self, task: RoundTask) -> None:
        """Download the federation's final global for this tier, once (`on_global` gets it as round rounds + 1)."""
        assert self.rank is not None
        ref = task.global_for(self.rank)
        if ref is None or self._final_received:
            return
        try:
            payload = self._download(ref.sha256)
        except (TimeoutError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not self._stop.is_set():
                raise
            log.warning("%s: the federation's final global did not arrive (%s); global_adapter stays the last "
                        "round's", self.client_id, err)
            return
        _, self.global_adapter = decode_adapter(payload, self.manifest)
        self._final_received = True
        if self.on_global is not None:
            self.on_global(task.round, self.global_adapter)

    def _round_data(self, round_number: int) -> list[Example]:
        data = self.data(round_number) if callable(self.data) else self.data
        examples = list(data)
        if not examples:
            raise ValueError(f"{self.client_id}: the data source gave no examples for round {round_number}.")
        return examples

    def _download(self, sha256: str) -> bytes:
        """The round's global adapter for this tier: subscribed only while needed, so a device
        that is not sampled downloads nothing (the chunks are retained, so they arrive on subscribe)."""
        assert self.rank is not None
        topic = self.topics.global_chunks(self.rank)
        self._global = None
        self.connection.subscribe(topic)
        try:
            return self._wait(lambda: self._global if self._global is not None and
                              hashlib.sha256(self._global).hexdigest() == sha256 else None,
                              120, f"the global adapter for r={self.rank}")
        finally:
            self.connection.unsubscribe(topic)
            self._globals.expire(0)

    # Messages (network thread) -----------------------------------------------------------------

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        try:
            self._dispatch(message.topic, message.payload)
        except UnsupportedVersionError as err:
            self._refused = f"incompatible message on {message.topic}: {err}"
        except (MessageError, ChunkError, CodecError) as err:
            log.warning("%s: dropped a bad message on %s: %s", self.client_id, message.topic, err)
        with self._changed:
            self._changed.notify_all()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.config:
            self.config = decode_message(payload, FederationConfig) if payload else None
        elif topic == self.topics.task:
            self._task = decode_message(payload, RoundTask) if payload else None
        elif topic == self.topics.notice(self.client_id):
            notice = decode_message(payload, Notice)
            log.warning("%s: aggregator %s: %s", self.client_id, notice.verdict, notice.reason)
            if notice.verdict == "refused":
                self._refused = notice.reason
        elif self.rank is not None and topic.startswith(self.topics.global_chunks(self.rank)[:-1]) and payload:
            complete, _ = self._globals.add(GLOBAL_SENDER, payload)
            if complete is not None:
                self._global = complete

    def _announce(self) -> None:
        if self._status is not None:
            self.connection.publish(self.topics.status(self.client_id), self._status, retain=True)

    def _wait(self, ready: Callable[[], object], timeout: float | None, what: str, allow_stop: bool = False):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                if self._refused:
                    raise ClientRefusedError(f"The aggregator refused {self.client_id}: {self._refused}")
                value = ready()
                if value is not None:
                    return value
                if self._stop.is_set():
                    if allow_stop:
                        return None
                    raise RuntimeError(f"{self.client_id} was stopped while waiting for {what}.")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.client_id}: no {what} within {timeout:.0f} s.")
                self._changed.wait(0.5 if remaining is None else min(0.5, remaining))

    # Local state -------------------------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.state_dir / f"{self.client_id}.json"

    def _last_uploaded(self) -> int:
        try:
            return int(json.loads(self._state_file().read_text())["last_uploaded_round"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _record_upload(self, round_number: int) -> None:
        write_atomic(self._state_file(), json.dumps({"last_uploaded_round": round_number}).encode())

    def _stored_client_id(self) -> str:
        path = self.state_dir / "client-id"
        if path.exists():
            return path.read_text().strip()
        host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40].strip("-.") or "device"
        generated = f"{host}-{uuid.uuid4().hex[:8]}"
        write_atomic(path, generated.encode())
        return generated
