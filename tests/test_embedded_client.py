"""The embeddable client API and the embedded (amqtt) broker: a federation inside one process."""

from __future__ import annotations

import threading
import time

import pytest

from aggregator.broker import EmbeddedBroker
from edge_sdk.client import FederatedClient
from edge_sdk.datasets import shard
from edge_sdk.protocol import TrainingConfig
from tests.federation import aggregator_thread, rotten_tomatoes_split

pytestmark = pytest.mark.slow


def test_two_app_clients_federate_through_the_embedded_broker_and_a_late_one_returns_at_once(
        minilm_bundle, tmp_path):
    pool, _ = rotten_tomatoes_split()
    progress: list[tuple[str, int, int]] = []
    with EmbeddedBroker() as broker:
        aggregator, agg_thread, errors = aggregator_thread(
            minilm_bundle, broker.settings, tmp_path / "state", "embedded", rounds=2, clients_per_round=2,
            min_clients=2, min_online=2, round_timeout=120, training=TrainingConfig(steps=3, batch_size=8),
        )
        clients = [
            FederatedClient(minilm_bundle, broker.settings, "embedded",
                            data=lambda round_number, i=i: shard(pool, i, 2)[:48 + 8 * round_number],
                            client_id=f"app{i}", threads=1, state_dir=tmp_path / "clients",
                            on_progress=lambda r, step, loss, i=i: progress.append((f"app{i}", r, step)))
            for i in range(2)
        ]
        reports: dict[str, list] = {}
        threads = [threading.Thread(target=lambda c=c: reports.__setitem__(c.client_id, c.run())) for c in clients]
        for thread in threads:
            thread.start()
        agg_thread.join(300)
        for thread in threads:
            thread.join(60)
        assert not agg_thread.is_alive() and not errors, errors

        late = FederatedClient(minilm_bundle, broker.settings, "embedded", data=shard(pool, 0, 2)[:16],
                               client_id="late", threads=1, state_dir=tmp_path / "clients")
        late.start()
        waiter = threading.Thread(target=lambda: reports.__setitem__("late", late.run()))
        started = time.monotonic()
        waiter.start()
        waiter.join(30)
        assert not waiter.is_alive(), "a finished federation ends run()"
        assert time.monotonic() - started < 30

    assert [m.participants for m in aggregator.records] == [["app0", "app1"]] * 2
    for i in range(2):
        assert [r.round for r in reports[f"app{i}"]] == [1, 2]
        assert [r.samples for r in reports[f"app{i}"]] == [56, 64]
        assert {(r, s) for c, r, s in progress if c == f"app{i}"} == {(r, s) for r in (1, 2) for s in (1, 2, 3)}
    assert reports["late"] == []
