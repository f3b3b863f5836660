"""≥1000 malformed payloads into a live round: each is dropped with a reason, nothing crashes, the result is unchanged;
and a restart after a kill at the end of a round announces what the kill cut off."""

from __future__ import annotations

import json
import logging
import pickle
import random

import numpy as np
import pytest

from edge_sdk.protocol import (
    AdapterHeader, FeatureStatistics, decode_adapter, encode_adapter, max_payload_bytes, split_payload,
)
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol.transport import BrokerSettings
from tests.federation import ReplayClient, aggregator_thread, wait_for

pytestmark = pytest.mark.slow
CLIENTS = {"dev0": "r2-0", "dev1": "r8-0", "dev2": "r2-1"}


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _malformed(adapters, manifest, federation: str, round_number: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """(sender, message) pairs; every one must be rejected: framing, checksums, schema, values and identity."""
    r2, r8 = adapters["r2-0"], adapters["r8-0"]
    header = dict(federation=federation, round=round_number, rank=2, num_samples=10)

    def framed(adapter: Adapter, **overrides) -> bytes:
        return split_payload(encode_adapter(adapter, AdapterHeader(**{"client_id": "dev0", **header, **overrides})))[0]

    def broken(transform) -> Adapter:
        return Adapter(rank=2, lora={k: transform(k, a, b) for k, (a, b) in r2.lora.items()}, head=dict(r2.head))

    first_layer = next(iter(r2.lora))
    valid = encode_adapter(r2, AdapterHeader(client_id="dev0", **header))
    cases: list[tuple[str, bytes]] = []
    cases += [("dev0", rng.randbytes(rng.randrange(0, 2048))) for _ in range(200)]
    cases += [("dev1", split_payload(valid)[0][: rng.randrange(1, 2000)]) for _ in range(100)]
    cases += [("dev2", _flip(split_payload(valid)[0], rng)) for _ in range(150)]
    cases += [("dev0", split_payload(_flip(valid, rng))[0]) for _ in range(100)]
    cases += [("dev1", split_payload(valid[: rng.randrange(1, len(valid))])[0]) for _ in range(100)]
    cases += [("dev0", pickle.dumps({"rank": 2, "lora": "x"})), ("dev0", split_payload(pickle.dumps([1, 2]))[0])] * 5
    cases += [("dev2", split_payload(b"\0" * (max_payload_bytes(manifest) + 1))[0])] * 3
    nan = broken(lambda k, a, b: (np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a), b))
    inf = broken(lambda k, a, b: (a, np.full_like(b, np.inf)))
    wrong_shape = broken(lambda k, a, b: (a[:, :-1], b))
    lying_rank = Adapter(rank=8, lora=r2.lora, head=r2.head)
    unknown = Adapter(rank=2, lora={**r2.lora, "encoder.layer.99.attention.self.query": r2.lora[first_layer]},
                      head=r2.head)
    missing = Adapter(rank=2, lora={k: v for k, v in r2.lora.items() if k != first_layer}, head=r2.head)
    headless = Adapter(rank=2, lora=r2.lora, head={})
    unasked = FeatureStatistics.zeros(len(manifest.labels), manifest.feature_width)
    unasked.add(np.ones((4, manifest.feature_width), dtype=np.float32), np.zeros(4, dtype=np.int64))
    for sender, message in [
        ("dev0", framed(nan)), ("dev0", framed(inf)), ("dev1", framed(wrong_shape)), ("dev0", framed(lying_rank)),
        ("dev2", framed(unknown)), ("dev0", framed(missing)), ("dev0", framed(headless)),
        ("mallory", framed(r2)),                                         # forged: claims dev0 on mallory's topic
        ("dev1", framed(r8, client_id="dev1", federation="other")),      # foreign federation
        ("dev1", framed(r8, client_id="dev1", rank=8, round=round_number + 1)),   # future round
        ("dev1", framed(r8, client_id="dev1", rank=8, round=round_number - 1)),   # late
        ("mallory", framed(r2, client_id="mallory")),                    # not sampled
        ("dev2", framed(r2, client_id="dev2", num_samples=0)),          # invalid sample count
        ("dev2", framed(r2, client_id="dev2", dtype="int8").replace(b'"int8"', b'"fp64"', 1)),
        ("dev0", framed(r8, rank=8)),                                    # not the tier dev0 announced (r=2)
        ("dev2", framed(r2, client_id="dev2", num_samples=10**309)),     # a count no float holds
        ("dev2", framed(r2, client_id="dev2", metrics={"x" * 60_000: 1.0})),
        ("dev2", framed(r2, client_id="dev2", metrics={"loss": 0.5}).replace(b"0.5", b"NaN", 1)),
        ("dev2", framed(r2, client_id="dev2").replace(f'"round": {round_number}'.encode(),
                                                      f'"round": {round_number + 1}'.encode(), 1)),  # altered header
        ("dev0", framed(broken(lambda k, a, b: (a * 1e20, b * 1e-20)))),  # same ΔW, Grams overflow float32
        ("dev0", framed(Adapter(2, r2.lora, r2.head, unasked))),          # statistics nobody asked for
    ]:
        cases += [(sender, message)] * 25
    rng.shuffle(cases)
    return cases


def _federation(bundle, broker, adapters, tmp_path, name: str, fuzz: bool,
                caplog) -> tuple[Adapter, dict, int, int]:
    settings = BrokerSettings.from_url(broker.url)
    manifest = read_manifest(bundle)
    aggregator, thread, errors = aggregator_thread(
        bundle, settings, tmp_path / name, name, rounds=1, clients_per_round=3, min_clients=3, round_timeout=300,
    )
    clients = {cid: ReplayClient(settings, name, cid, adapters[key].rank).join() for cid, key in CLIENTS.items()}
    task = next(iter(clients.values())).next_task()
    sent = distinct = 0
    if fuzz:
        mallory = ReplayClient(settings, name, "mallory", 2).join()
        cases = _malformed(adapters, manifest, name, task.round, random.Random(0))
        for sender in sorted({s for s, _ in cases}):
            mallory.send_raw(f"fedpeft/{name}/clients/{sender}/update", [m for s, m in cases if s == sender])
        sent, distinct = len(cases), len(set(cases))
        wait_for(lambda: aggregator.rejections_total >= sent - 4, 300, "every malformed payload to be handled")
        assert thread.is_alive(), errors
        mallory.close()
    for cid, key in CLIENTS.items():
        adapter = adapters[key]
        clients[cid].upload(encode_adapter(adapter, AdapterHeader(
            federation=name, round=task.round, client_id=cid, rank=adapter.rank, num_samples=40 + len(cid))))
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    for client in clients.values():
        client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "the aggregator must only log warnings"
    record = aggregator.records[0]
    payload = (tmp_path / name / "rounds" / "0001" / "global-r8.fpa").read_bytes()
    return decode_adapter(payload, manifest)[1], record, sent, distinct


def test_a_thousand_malformed_updates_are_dropped_and_change_nothing(minilm_bundle, trained_adapters, mosquitto,
                                                                    tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedpeft")
    clean, clean_record, *_ = _federation(minilm_bundle, mosquitto, trained_adapters, tmp_path, "clean", False, caplog)
    fuzzed, record, sent, distinct = _federation(minilm_bundle, mosquitto, trained_adapters, tmp_path, "fuzzed",
                                                 True, caplog)
    assert sent >= 1000
    assert record.participants == clean_record.participants == sorted(CLIENTS)
    assert record.rejected >= sent - 4
    logged = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert 0 < len(logged) <= distinct, "a repeated refusal is logged (and notified) once per sender and reason"
    reasons = " ".join(record.rejected_reasons.values())
    assert "forged sender" in record.rejected_reasons["mallory"] or "not sampled" in reasons
    for layer, (a, b) in clean.lora.items():
        assert np.array_equal(fuzzed.lora[layer][0], a) and np.array_equal(fuzzed.lora[layer][1], b)
    for name, value in clean.head.items():
        assert np.array_equal(fuzzed.head[name], value)


def test_a_round_closed_but_not_announced_before_a_kill_is_announced_at_restart(minilm_bundle, trained_adapters,
                                                                                 mosquitto, tmp_path):
    """A kill between advancing the state and announcing the round: the restart appends the round to the
    metrics file and publishes its result, from the record saved with the round."""
    settings = BrokerSettings.from_url(mosquitto.url)
    state, metrics = tmp_path / "state", tmp_path / "metrics.jsonl"
    options = dict(rounds=1, clients_per_round=1, min_clients=1, round_timeout=300, metrics_file=metrics)
    aggregator, thread, errors = aggregator_thread(minilm_bundle, settings, state, "late", **options)
    device = ReplayClient(settings, "late", "dev0", 8).join()
    task = device.next_task()
    device.upload(encode_adapter(trained_adapters["r8-0"], AdapterHeader("late", task.round, "dev0", 8, 50)))
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    announced = metrics.read_text()
    saved = json.loads((state / "state.json").read_text())
    assert saved["round"] == 2 and saved["announced"] == 1
    saved["announced"] = 0
    (state / "state.json").write_text(json.dumps(saved))
    metrics.write_text("")

    again, thread, errors = aggregator_thread(minilm_bundle, settings, state, "late", **options)
    thread.join(120)
    device.close()
    assert not thread.is_alive() and not errors, errors
    assert [r.round for r in again.records] == [1]
    record, original = json.loads(metrics.read_text()), json.loads(announced)
    assert record.pop("close_seconds") == 0.0 < original.pop("close_seconds"), "closing time is measured after saving"
    assert record == original
    assert json.loads((state / "state.json").read_text())["announced"] == 1
