"""Helpers to run real federations in tests: client data shards, aggregator and client processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edge_sdk.data import Example, stratified_split
from edge_sdk.datasets import rotten_tomatoes, shard
from tests.conftest import ROOT, TEST_RANKS


def rotten_tomatoes_split(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Real Rotten Tomatoes snippets: (pool for client shards, held-out central test set)."""
    return stratified_split(rotten_tomatoes(), test_fraction=0.1, seed=seed)


def write_shards(folder: Path, pool: list[Example], sizes: list[int]) -> list[Path]:
    """Disjoint JSON-lines shards of the given sizes, one per client."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes):
        path = folder / f"client{index}.jsonl"
        rows = shard(pool, index, len(sizes))[:size]
        path.write_text("".join(json.dumps({"text": e.x, "label": e.label}) + "\n" for e in rows))
        paths.append(path)
    return paths


RUNNING: list[subprocess.Popen] = []
"""Every process the helpers start; the `reap_processes` fixture kills what a failed test left behind."""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def start_aggregator(bundle: Path, broker_url: str, state: Path, log: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "aggregator.cli", "--bundle", str(bundle), "--broker", broker_url,
               "--state-dir", str(state), "--metrics", str(state / "metrics.jsonl"), *args]
    process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    RUNNING.append(process)
    return process


def start_client(bundle: Path, broker_url: str, federation: str, data: Path, client_id: str, state: Path, log: Path,
                 *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "edge_sdk.client_cli", "--bundle", str(bundle), "--broker", broker_url,
               "--federation", federation, "--data", str(data), "--client-id", client_id, "--state-dir", str(state),
               "--eval-fraction", "0", *args]
    process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    RUNNING.append(process)
    return process


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finish(processes: list[subprocess.Popen], timeout: float, logs: list[Path]) -> None:
    """Wait for every process to exit 0; on failure show the logs' tails."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            code = process.wait(max(1, deadline - time.monotonic()))
            assert code == 0, f"{process.args[2]} exited {code}"
    except BaseException:
        for process in processes:
            if process.poll() is None:
                process.kill()
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
        raise AssertionError(f"federation did not finish cleanly:\n{tails}") from None


def read_metrics(state: Path) -> list[dict]:
    path = state / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ReplayClient:
    """A protocol-level device that joins at a tier and uploads given payloads: drives a real aggregator in tests."""

    def __init__(self, settings, federation: str, client_id: str, rank: int) -> None:
        import queue

        from edge_sdk.protocol import ClientStatus, Topics, encode_message
        from edge_sdk.protocol.transport import MqttConnection

        self.client_id, self.rank, self.topics = client_id, rank, Topics(federation)
        self.tasks: queue.Queue = queue.Queue()
        self.notices: list[dict] = []
        self._status = encode_message(ClientStatus(client_id=client_id, state="online", rank=rank))
        offline = encode_message(ClientStatus(client_id=client_id, state="offline"))
        self.connection = MqttConnection(
            f"fedpeft-{federation}-{client_id}", settings, self._on_message,
            subscriptions=[self.topics.task, self.topics.notice(client_id)], will=(self.topics.status(client_id), offline),
        )

    def join(self, timeout: float = 10) -> ReplayClient:
        self.connection.start(timeout)
        self.connection.publish_all([(self.topics.status(self.client_id), self._status, True)], timeout)
        return self

    def next_task(self, timeout: float = 60):
        """The next open task that samples this client."""
        import queue

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                task = self.tasks.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.client_id in task.sampled and not task.finished:
                return task
        raise AssertionError(f"{self.client_id} was not sampled within {timeout} s")

    def upload(self, payload: bytes, chunk_size: int = 1 << 20, timeout: float = 60) -> None:
        from edge_sdk.protocol import split_payload

        chunks = split_payload(payload, chunk_size)
        self.connection.publish_all([(self.topics.update(self.client_id), c, False) for c in chunks], timeout)

    def send_raw(self, topic: str, payloads: list[bytes], timeout: float = 120) -> None:
        self.connection.publish_all([(topic, p, False) for p in payloads], timeout)

    def close(self) -> None:
        self.connection.stop()

    def _on_message(self, message) -> None:
        from edge_sdk.protocol import MessageError, Notice, RoundTask, decode_message

        try:
            if message.topic == self.topics.task and message.payload:
                self.tasks.put(decode_message(message.payload, RoundTask))
            elif message.topic == self.topics.notice(self.client_id):
                notice = decode_message(message.payload, Notice)
                self.notices.append({"verdict": notice.verdict, "reason": notice.reason})
        except MessageError:
            pass


def aggregator_thread(bundle: Path, settings, state: Path, federation: str, **options):
    """A real Aggregator running in a thread of the test process; returns (aggregator, thread, errors)."""
    import threading

    from aggregator.service import Aggregator, AggregatorOptions

    aggregator = Aggregator(bundle, settings, AggregatorOptions(federation=federation, state_dir=state, **options))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            aggregator.run()
        except BaseException as err:  # surfaced by the test
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return aggregator, thread, errors


def run_until_finished(clients, agg_thread, timeout: float = 300) -> dict[str, list]:
    """Run each FederatedClient in its own thread until the aggregator's thread ends; client id → its reports."""
    import threading

    reports: dict[str, list] = {}
    threads = [threading.Thread(target=lambda c=c: reports.__setitem__(c.client_id, c.run())) for c in clients]
    for thread in threads:
        thread.start()
    agg_thread.join(timeout)
    for thread in threads:
        thread.join(60)
    return reports


def two_tier_simulation(bundle: Path, strategy: str, broker_url: str, out: Path) -> tuple[dict, list[dict], list[dict]]:
    """Six simulated devices on both test tiers, 3 rounds of 12 steps at α=1.0 over a real broker.

    Returns the run's summary, its per-round metrics rows and the aggregator's per-round records.
    """
    from edge_sdk.protocol import TrainingConfig
    from edge_sdk.rank import RankPolicy
    from fedpeft_sim.simulation import SimConfig, run_simulation

    config = SimConfig(
        bundle=bundle, out=out, strategy=strategy, clients=6, fraction=0.5, rounds=3, alpha=1.0, size_skew=0.5,
        dropout=0.0, seed=1, training=TrainingConfig(steps=12, batch_size=16, lr=4e-3, schedule="constant"),
        eval_samples=300, final_samples=600, local_eval_every=3, pool_limit=900, broker_url=broker_url,
        rank_policy=RankPolicy.balanced(max(TEST_RANKS), 2048 * 2**20, 0.1, 50),
    )
    summary = run_simulation(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads((out / "state" / "rounds" / f"{row['round']:04d}" / "metrics.json").read_text())
               for row in rows[1:]]
    return summary, rows, records
