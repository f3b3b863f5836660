"""Fan-in through mosquitto: N client updates into one aggregator, versus raw mosquitto + paho, in one run.

Usage: .venv/bin/python benchmarks/bench_mqtt.py --bundle runs/demo/bundle [--clients 200] [--rank 8] [--repeats 3]

Per repeat, N client connections in a separate publisher process send one codec payload each
(LoRA at --rank + head, about 300 KB at r=8):
  raw         a plain paho subscriber receives the same bytes (the transport ceiling);
  aggregator  the real Aggregator receives, reassembles, validates, decodes and persists
              (fsync) every update; the time runs from the first publish to the last update
              accepted on disk.
It also reports the aggregator's round overhead at --overhead-clients (default 100) instantly
answering clients: everything in a round except client training (task, fan-in, validation,
merge, persistence, publication of the per-tier global adapters). Prints medians and ratios.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.service import Aggregator, AggregatorOptions  # noqa: E402
from edge_sdk.protocol import (  # noqa: E402
    AdapterHeader, ClientStatus, RoundTask, Topics, decode_message, encode_adapter, encode_message, split_payload,
)
from edge_sdk.protocol.adapter import Adapter  # noqa: E402
from edge_sdk.protocol.manifest import read_manifest  # noqa: E402
from edge_sdk.protocol.transport import BrokerSettings, MqttConnection  # noqa: E402
from aggregator.broker import Mosquitto  # noqa: E402


def random_adapter(manifest, rank: int, rng: np.random.Generator) -> Adapter:
    tier = manifest.tier(rank)
    lora = {p.layer: (rng.standard_normal(p.a_shape, dtype=np.float32) * 0.01,
                      rng.standard_normal(p.b_shape, dtype=np.float32) * 0.01) for p in tier.lora_pairs}
    head = {n: rng.standard_normal(manifest.head_shapes[n], dtype=np.float32) * 0.01 for n in manifest.head_parameters}
    return Adapter(rank=rank, lora=lora, head=head)


def payloads(bundle: Path, federation: str, rank: int, clients: int, round_number: int) -> list[bytes]:
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(0)
    return [encode_adapter(random_adapter(manifest, rank, rng), AdapterHeader(
        federation=federation, round=round_number, client_id=f"c{i:04d}", rank=rank, num_samples=100))
        for i in range(clients)]


@click.group()
def cli() -> None:
    """Fan-in benchmark (run `measure`; `publish` is its child process)."""


@cli.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=int, required=True)
@click.option("--federation", required=True)
@click.option("--mode", type=click.Choice(["raw", "aggregator"]), required=True)
@click.option("--clients", type=int, required=True)
@click.option("--rank", type=int, required=True)
def publish(bundle: Path, port: int, federation: str, mode: str, clients: int, rank: int) -> None:
    """N client connections that each publish one update; prints the first-publish time as JSON."""
    settings = BrokerSettings(port=port)
    topics = Topics(federation)
    tasks: list[RoundTask] = []
    got_task = threading.Event()

    def on_task(message) -> None:
        if message.topic == topics.task and message.payload:
            tasks.append(decode_message(message.payload, RoundTask))
            got_task.set()

    ids = [f"c{i:04d}" for i in range(clients)]
    connections = [MqttConnection(f"bench-{federation}-{cid}", settings, lambda m: None).start() for cid in ids]
    messages = [split_payload(p)[0] for p in payloads(bundle, federation, rank, clients, round_number=1)]
    if mode == "aggregator":
        watcher = MqttConnection(f"bench-{federation}-watcher", settings, on_task, subscriptions=[topics.task]).start()
        for cid, connection in zip(ids, connections):
            status = ClientStatus(client_id=cid, state="online", rank=rank)
            connection.publish(topics.status(cid), encode_message(status), retain=True)
        if not got_task.wait(120):
            raise SystemExit("no task from the aggregator")
        if tasks[-1].round != 1:
            raise SystemExit(f"expected the first round of a fresh federation, got round {tasks[-1].round}")
        watcher.stop()
    topic = (lambda cid: topics.update(cid)) if mode == "aggregator" else (lambda cid: f"bench/raw/{cid}")
    start = time.time()
    infos = [c.publish(topic(cid), m) for cid, c, m in zip(ids, connections, messages)]
    for info in infos:
        info.wait_for_publish(300)
    print(json.dumps({"first_publish": start, "bytes": sum(len(m) for m in messages)}))
    for connection in connections:
        connection.stop()


def run_publisher(bundle: Path, port: int, federation: str, mode: str, clients: int, rank: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "publish", "--bundle", str(bundle), "--port", str(port), "--federation",
               federation, "--mode", mode, "--clients", str(clients), "--rank", str(rank)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def publisher_result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise SystemExit(f"publisher failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def raw_seconds(bundle: Path, broker: Mosquitto, clients: int, rank: int) -> tuple[float, int]:
    received: list[float] = []
    done = threading.Event()

    def on_message(_message) -> None:
        received.append(time.time())
        if len(received) == clients:
            done.set()

    subscriber = MqttConnection("bench-raw-sub", BrokerSettings(port=broker.port), on_message,
                                subscriptions=["bench/raw/#"]).start()
    time.sleep(0.2)
    result = publisher_result(run_publisher(bundle, broker.port, "raw", "raw", clients, rank))
    if not done.wait(300):
        raise SystemExit(f"raw: only {len(received)} of {clients} messages arrived")
    subscriber.stop()
    return max(received) - result["first_publish"], result["bytes"]


def aggregator_run(bundle: Path, broker: Mosquitto, clients: int, rank: int, state: Path) -> tuple[float, int, dict]:
    federation = state.name
    aggregator = Aggregator(bundle, BrokerSettings(port=broker.port), AggregatorOptions(
        federation=federation, rounds=1, state_dir=state, clients_per_round=clients, min_clients=clients,
        round_timeout=600))
    thread = threading.Thread(target=aggregator.run, daemon=True)
    thread.start()
    result = publisher_result(run_publisher(bundle, broker.port, federation, "aggregator", clients, rank))
    thread.join(600)
    accepted = [p.stat().st_mtime for p in (state / "rounds" / "0001" / "updates").glob("*.fpa")]
    if len(accepted) != clients:
        raise SystemExit(f"aggregator accepted {len(accepted)} of {clients} updates")
    return max(accepted) - result["first_publish"], result["bytes"], aggregator.records[0]


@cli.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--clients", type=int, default=200, show_default=True)
@click.option("--overhead-clients", type=int, default=100, show_default=True)
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
def measure(bundle: Path, clients: int, overhead_clients: int, rank: int, repeats: int) -> None:
    """Median fan-in throughput (raw vs aggregator) and the aggregator's round overhead."""
    raw, agg, overhead, merge = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as folder:
        for repeat in range(repeats):
            broker = Mosquitto(Path(folder) / f"broker{repeat}").start()
            try:
                seconds, size = raw_seconds(bundle, broker, clients, rank)
                raw.append(size / seconds / 1e6)
                seconds, size, _ = aggregator_run(bundle, broker, clients, rank, Path(folder) / f"fan-in{repeat}")
                agg.append(size / seconds / 1e6)
                _, _, record = aggregator_run(bundle, broker, overhead_clients, rank, Path(folder) / f"round{repeat}")
                overhead.append(record.round_seconds + record.close_seconds)
                merge.append(record.merge_seconds)
            finally:
                broker.stop()
            print(f"repeat {repeat + 1}: raw {raw[-1]:.0f} MB/s, aggregator {agg[-1]:.0f} MB/s, "
                  f"round overhead ({overhead_clients} clients) {overhead[-1]:.2f} s", flush=True)
    print(f"\n{clients} clients × r={rank} update ({size / clients / 1e3:.0f} KB each), mosquitto on loopback:")
    print(f"  raw mosquitto + paho      {statistics.median(raw):7.1f} MB/s")
    print(f"  aggregator (validated)    {statistics.median(agg):7.1f} MB/s   "
          f"ratio {statistics.median(agg) / statistics.median(raw):.2f} of raw (goal ≥ 80 MB/s)")
    print(f"round overhead at {overhead_clients} clients: {statistics.median(overhead):.2f} s "
          f"(merge {1000 * statistics.median(merge):.0f} ms; goal < 1 s)")


if __name__ == "__main__":
    cli()
