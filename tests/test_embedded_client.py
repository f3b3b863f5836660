"""The embeddable client API and the embedded (amqtt) broker: a federation inside one process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aggregator.broker import EmbeddedBroker
from aggregator.state import StateDir
from edge_sdk.client import FederatedClient
from edge_sdk.datasets import shard
from edge_sdk.protocol import TrainingConfig, decode_adapter
from edge_sdk.protocol.manifest import read_manifest
from tests.federation import aggregator_thread, rotten_tomatoes_split, run_until_finished

pytestmark = pytest.mark.slow


def test_two_app_clients_federate_through_the_embedded_broker_and_a_late_one_returns_at_once(
        minilm_bundle, tmp_path):
    pool, held_out = rotten_tomatoes_split()
    progress: list[tuple[str, int, int]] = []
    received: dict[str, list[tuple[int, object]]] = {"app0": [], "app1": []}
    scored: dict[str, list[float]] = {"app0": [], "app1": []}

    def app_evaluation(name: str):
        def evaluate(predictor) -> dict[str, float]:
            accuracy = float(np.mean(np.array(predictor.predict(held_out[:64])) == [e.label for e in held_out[:64]]))
            scored[name].append(accuracy)
            return {"held_out_accuracy": accuracy}
        return evaluate

    with EmbeddedBroker() as broker:
        aggregator, agg_thread, errors = aggregator_thread(
            minilm_bundle, broker.settings, tmp_path / "state", "embedded", rounds=2, clients_per_round=2,
            min_clients=2, min_online=2, round_timeout=120, training=TrainingConfig(steps=3, batch_size=8),
        )
        clients = [
            FederatedClient(minilm_bundle, broker.settings, "embedded",
                            data=lambda round_number, i=i: shard(pool, i, 2)[:48 + 8 * round_number],
                            client_id=f"app{i}", threads=1, state_dir=tmp_path / "clients",
                            on_progress=lambda r, step, loss, i=i: progress.append((f"app{i}", r, step)),
                            on_global=lambda r, adapter, i=i: received[f"app{i}"].append((r, adapter)),
                            evaluate=app_evaluation(f"app{i}"))
            for i in range(2)
        ]
        reports = run_until_finished(clients, agg_thread)
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
    store = StateDir(tmp_path / "state")
    for name in ("app0", "app1"):
        assert [r for r, _ in received[name]] == [2, 3], \
            "round 1 starts from the bundle, round 2 from round 1's global; the finished federation hands over round 2's"
        rank = aggregator.records[0].ranks[name]
        for (_, got), after in zip(received[name], (1, 2)):
            _, expected = decode_adapter(store.globals(after)[rank], read_manifest(minilm_bundle))
            for layer, (a, b) in expected.lora.items():
                np.testing.assert_array_equal(got.lora[layer][0], a)
                np.testing.assert_array_equal(got.lora[layer][1], b)
        assert clients[int(name[-1])].global_adapter is received[name][-1][1]
    personal = clients[0].personalize(2)
    assert clients[0].personal_adapter is personal and personal.rank == clients[0].rank
    assert any(not np.array_equal(personal.lora[k][1], clients[0].global_adapter.lora[k][1]) for k in personal.lora)


def test_personalize_needs_the_federations_global_first(minilm_bundle, tmp_path):
    from edge_sdk.protocol.transport import BrokerSettings

    pool, _ = rotten_tomatoes_split()
    client = FederatedClient(minilm_bundle, BrokerSettings.from_url("mqtt://127.0.0.1:1"), "solo", data=pool[:8],
                             client_id="solo", state_dir=tmp_path)
    with pytest.raises(RuntimeError, match="no global adapter yet"):
        client.personalize(2)
        sent = [record.client_metrics[name]["app_held_out_accuracy"] for record in aggregator.records]
        assert sent == scored[name] and all(0 <= x <= 1 for x in sent)


def test_app_metrics_are_refused_on_the_device_when_the_aggregator_would_refuse_them() -> None:
    from edge_sdk.client import app_metrics

    assert app_metrics({"accuracy": 0.75, "kept": 3}) == {"app_accuracy": 0.75, "app_kept": 3.0}
    for bad, message in [({"x": float("nan")}, "finite"), ({"": 1.0}, "characters"), ({"y" * 61: 1.0}, "characters"),
                         ({f"m{i}": 1.0 for i in range(17)}, "at most 16"), ({"flag": True}, "finite number")]:
        with pytest.raises(ValueError, match=message):
            app_metrics(bad)


def test_the_app_embedding_example_federates_labels_notes_and_reports_its_own_score(minilm_bundle, mosquitto,
                                                                                    tmp_path):
    """examples/app_embedding.py as a user runs it (its on_global and evaluate hooks), against a real aggregator
    over a real mosquitto."""
    from edge_sdk.protocol.transport import BrokerSettings

    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    pool, _ = rotten_tomatoes_split()
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": e.x, "label": e.label}) + "\n" for e in pool[:60]))
    aggregator, agg_thread, errors = aggregator_thread(
        minilm_bundle, BrokerSettings.from_url(mosquitto.url), tmp_path / "state", "notes", rounds=2,
        clients_per_round=1, min_clients=1, round_timeout=120, training=TrainingConfig(steps=2, batch_size=8),
    )
    app = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "app_embedding.py"), "--bundle", str(minilm_bundle),
         "--broker", mosquitto.url, "--federation", "notes", "--notes", str(notes), "--client-id", "notes-app"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "HOME": str(tmp_path)},
    )
    agg_thread.join(60)
    assert app.returncode == 0 and not errors, app.stdout[-2000:] + app.stderr[-2000:]
    assert "[app] global model for round 2: newest note labelled" in app.stdout, app.stdout
    assert "[app] federation left cleanly (notes-app)." in app.stdout
    scores = [record.client_metrics["notes-app"]["app_kept_back_accuracy"] for record in aggregator.records]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
