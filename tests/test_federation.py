"""Real federations: aggregator and clients as separate processes through a real mosquitto broker."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.closed_form import closed_form_head
from aggregator.privacy import KEY, DpSettings, Sampling
from aggregator.round_merge import merge_with_server
from aggregator.server_state import ServerOptimizer, ServerState, initial_adapter
from aggregator.state import SERVER_STATE_FILE, StateDir
from edge_sdk.protocol import FeatureStatistics, decode_adapter
from edge_sdk.protocol.codec import STATISTICS_KEYS
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer
from tests.federation import (
    finish, read_metrics, rotten_tomatoes_split, start_aggregator, start_client, wait_for, write_shards,
)

pytestmark = pytest.mark.slow


def _global(state, round_number: int, rank: int, manifest):
    return decode_adapter((state / "rounds" / f"{round_number:04d}" / f"global-r{rank}.fpa").read_bytes(), manifest)[1]


def _retained(url: str, topic: str, timeout: float = 5.0) -> dict:
    """Retained messages under `topic` (a filter), topic → JSON, read by a plain paho subscriber."""
    seen: dict[str, dict] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: seen.__setitem__(m.topic, json.loads(m.payload) if m.payload else None)
    host, port = url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.subscribe(topic, qos=1)
    client.loop_start()
    time.sleep(min(timeout, 1.0))
    client.loop_stop()
    client.disconnect()
    return seen


def test_five_clients_three_rounds_mixed_tiers_beat_the_zero_shot_head(minilm_bundle, mosquitto, tmp_path):
    pool, held_out = rotten_tomatoes_split()
    shards = write_shards(tmp_path / "data", pool, [160] * 5)
    state = tmp_path / "state"
    logs = [tmp_path / "aggregator.log", *(tmp_path / f"client{i}.log" for i in range(5))]
    aggregator = start_aggregator(
        minilm_bundle, mosquitto.url, state, logs[0], "--federation", "e2e", "--rounds", "3",
        "--clients-per-round", "5", "--min-clients", "5", "--round-timeout", "300", "--steps", "10", "--lr", "6e-3",
        "--normalizers", "2048,0.1,50", "--server-opt", "none",
    )
    presets = ["low", "low", "mid", "high", "high"]
    clients = [start_client(minilm_bundle, mosquitto.url, "e2e", shards[i], f"dev{i}", tmp_path / "clients", logs[i + 1],
                            "--profile", presets[i]) for i in range(5)]
    finish([aggregator, *clients], 900, logs)

    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(m["participants"] == [f"dev{i}" for i in range(5)] and m["rejected"] == 0 for m in metrics)
    ranks = metrics[-1]["ranks"]
    assert {ranks["dev0"], ranks["dev2"], ranks["dev3"]} == {2, 8}, ranks
    assert all(m["bytes_accepted"] < 0.002 * m["full_fedavg_bytes"] for m in metrics)

    manifest = read_manifest(minilm_bundle)
    trainer = Trainer(minilm_bundle, 8, threads=2)
    test = held_out[:400]
    zero_shot = trainer.evaluate(test)
    trainer.set_adapter(_global(state, 3, 8, manifest))
    federated = trainer.evaluate(test)
    assert federated.accuracy > zero_shot.accuracy + 0.05, (zero_shot, federated)
    peft_config = json.loads((state / "rounds" / "0003" / "peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == 8


@pytest.mark.parametrize("server", [("--server-opt", "none"), ("--server-opt", "adam", "--server-lr", "1e-3", "--strategy", "svd-weighted",
                                         "--server-schedule", "cosine", "--server-lr-floor", "0.1",
                                         "--closed-form-head", "--statistics-rounds", "1"),
                                    ("--strategy", "dp-fedavg", "--server-opt", "sgd", "--server-lr", "1",
                                     "--server-beta1", "0", "--server-schedule", "constant", "--dp-clip", "0.5",
                                     "--dp-noise", "0.3")],
                         ids=["replace-merge", "server-adam-closed-form-head", "dp-fedavg"])
def test_kill_9_of_the_aggregator_mid_round_loses_nothing_and_matches_an_uninterrupted_run(
        minilm_bundle, mosquitto, tmp_path, server):
    pool, _ = rotten_tomatoes_split()
    shards = write_shards(tmp_path / "data", pool, [32, 160, 320])
    args = ("--federation", "crash", "--rounds", "2", "--clients-per-round", "3", "--min-clients", "3",
            "--round-timeout", "300", "--epochs", "1", "--lr", "3e-3", *server)

    def federation(name: str, kill_in_round: int | None) -> tuple[object, list[dict]]:
        state, logs = tmp_path / name, [tmp_path / f"{name}-aggregator.log"]
        fed_args = (*args[:1], name, *args[2:])
        aggregator = start_aggregator(minilm_bundle, mosquitto.url, state, logs[0], *fed_args)
        clients = []
        for i in range(3):
            logs.append(tmp_path / f"{name}-client{i}.log")
            clients.append(start_client(minilm_bundle, mosquitto.url, name, shards[i], f"dev{i}", tmp_path / name / "c",
                                        logs[-1], "--threads", "1", "--profile", "mid"))
        if kill_in_round is not None:
            updates = state / "rounds" / f"{kill_in_round:04d}" / "updates"
            wait_for(lambda: updates.is_dir() and len(list(updates.glob("*.fpa"))) >= 1, 300, "a first accepted update")
            os.kill(aggregator.pid, signal.SIGKILL)
            aggregator.wait()
            if "dp-fedavg" in server:
                (tmp_path / "round1-state").write_bytes(StateDir(state).round_dir(1).joinpath(SERVER_STATE_FILE).read_bytes())
            accepted_before = sorted(p.stem for p in updates.glob("*.fpa"))
            assert 1 <= len(accepted_before) < 3, "the kill must land in the middle of the round"
            aggregator = start_aggregator(minilm_bundle, mosquitto.url, state, logs[0], *fed_args)
        finish([aggregator, *clients], 600, logs)
        metrics = read_metrics(state)
        if kill_in_round is not None:
            assert set(accepted_before) <= set(metrics[kill_in_round - 1]["participants"])
        return _global(state, 2, 8, read_manifest(minilm_bundle)), metrics

    if "dp-fedavg" in server:
        _, crash_metrics = federation("crashed", kill_in_round=2)
        _check_private_resume(tmp_path / "crashed", (tmp_path / "round1-state").read_bytes(), minilm_bundle,
                              crash_metrics)
        return
    uninterrupted, clean_metrics = federation("clean", None)
    resumed, crash_metrics = federation("crashed", kill_in_round=2)
    assert [m["participants"] for m in crash_metrics] == [m["participants"] for m in clean_metrics]
    for layer, (a, b) in uninterrupted.lora.items():
        np.testing.assert_allclose(resumed.lora[layer][0], a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(resumed.lora[layer][1], b, rtol=0, atol=1e-6)
    for name, value in uninterrupted.head.items():
        np.testing.assert_allclose(resumed.head[name], value, rtol=0, atol=1e-6)
    if "--closed-form-head" in server:
        _check_closed_form_head(tmp_path / "crashed", read_manifest(minilm_bundle))


def _check_private_resume(state, round1_state: bytes, bundle, crash_metrics) -> None:
    """Each federation draws its own secret noise key, so an uninterrupted run would differ in its noise: instead,
    the crashed run must have kept its key across the kill and merged round 2 exactly as an uninterrupted
    aggregator would from round 1's state (saved at the kill) and the accepted updates."""
    manifest, store = read_manifest(bundle), StateDir(state)
    before, after = ServerState.from_bytes(round1_state, "exact"), store.server_state(2, "exact")
    np.testing.assert_array_equal(before.moments[KEY], after.moments[KEY])
    updates = {p.stem: decode_adapter(p.read_bytes(), manifest) for p in (state / "rounds" / "0002" / "updates").glob("*.fpa")}
    sent = {rank: decode_adapter(p, manifest)[1] for rank, p in store.globals(1).items()}
    filler = {name: a for name, (a, _) in initial_adapter(bundle, manifest, max(manifest.ranks), True).lora.items()}
    _, _, again = merge_with_server("dp-fedavg", updates, sent, before, ServerOptimizer("sgd", lr=1.0, beta1=0.0),
                                    manifest, filler, privacy=DpSettings(0.5, 0.3), sampling=Sampling(3, 3))
    for key, value in after.params.items():
        np.testing.assert_array_equal(again.params[key], value)
    assert 0 < crash_metrics[0]["dp_epsilon"] < crash_metrics[1]["dp_epsilon"] < math.inf
    assert all(m["dp_delta"] == pytest.approx(1 / 3) for m in crash_metrics)


def _check_closed_form_head(state, manifest) -> None:
    """Round 1's updates carry statistics, round 2's none (--statistics-rounds 1): the server pooled round 1's,
    its head is their linear discriminant, and round 2 kept it while the adapter moved on."""
    sent = [[decode_adapter(path.read_bytes(), manifest)[1].statistics
             for path in (state / "rounds" / f"{r:04d}" / "updates").glob("*.fpa")] for r in (1, 2)]
    assert all(s is not None for s in sent[0]) and sent[1] and all(s is None for s in sent[1])
    saved = StateDir(state).server_state(2, "exact")
    np.testing.assert_allclose(saved.moments["stats::counts"], sum(s.counts for s in sent[0]), rtol=1e-6)
    weight, bias = closed_form_head(FeatureStatistics(*(saved.moments[k].astype(np.float64) for k in STATISTICS_KEYS)))
    first, second = _global(state, 1, 8, manifest), _global(state, 2, 8, manifest)
    np.testing.assert_allclose(second.head[manifest.output_bias], bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.head[manifest.output_weight], weight, rtol=1e-5, atol=1e-4)
    for name, value in first.head.items():
        np.testing.assert_array_equal(second.head[name], value)
    assert any(not np.array_equal(first.lora[k][1], second.lora[k][1]) for k in first.lora)


def test_kill_9_mid_transfer_keeps_the_chunks_already_acknowledged(minilm_bundle, trained_adapters, mosquitto,
                                                                  tmp_path):
    """Chunks of an unfinished update are on disk before the broker forgets them: after a kill -9 in the
    middle of a 7-chunk transfer, the restarted aggregator completes it from the rest the broker queued,
    and removes the temp files that writes cut short leave behind."""
    from edge_sdk.protocol import AdapterHeader, encode_adapter, split_payload
    from edge_sdk.protocol.transport import BrokerSettings
    from tests.federation import ReplayClient

    state, log = tmp_path / "state", tmp_path / "aggregator.log"
    args = ("--federation", "durable", "--rounds", "1", "--clients-per-round", "1", "--min-clients", "1",
            "--round-timeout", "300", "--chunk-size", "65536")
    aggregator = start_aggregator(minilm_bundle, mosquitto.url, state, log, *args)
    device = ReplayClient(BrokerSettings.from_url(mosquitto.url), "durable", "dev0", 8).join()
    task = device.next_task()
    adapter = trained_adapters["r8-0"]
    payload = encode_adapter(adapter, AdapterHeader("durable", task.round, "dev0", 8, 50))
    chunks = split_payload(payload, 65536)
    assert len(chunks) >= 4
    kept = state / "rounds" / "0001" / "chunks" / "dev0"
    device.send_raw(device.topics.update("dev0"), chunks[:3])
    wait_for(lambda: kept.is_dir() and len(list(kept.glob("*.chunk"))) == 3, 60, "three chunks on disk")
    os.kill(aggregator.pid, signal.SIGKILL)
    aggregator.wait()
    leftovers = [state / ".state.json.k2x9", state / "rounds" / "0001" / "updates" / ".dev1.fpa.q7w1",
                 kept / ".0a1b.chunk.zz3", state / "rounds" / "0001" / ".peft.old" / "adapter_config.json"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")
    device.send_raw(device.topics.update("dev0"), chunks[3:])
    aggregator = start_aggregator(minilm_bundle, mosquitto.url, state, log, *args)
    finish([aggregator], 300, [log])
    device.close()
    assert read_metrics(state)[0]["participants"] == ["dev0"]
    assert (state / "rounds" / "0001" / "updates" / "dev0.fpa").read_bytes() == payload
    assert not (state / "rounds" / "0001" / "chunks").exists()
    assert not any(p.exists() for p in leftovers) and not (state / "rounds" / "0001" / ".peft.old").exists(), \
        "interrupted writes are removed at start-up"


def test_two_vanished_clients_are_dropouts_at_once_then_one_rejoins(minilm_bundle, mosquitto, tmp_path):
    pool, _ = rotten_tomatoes_split()
    shards = write_shards(tmp_path / "data", pool, [96, 96, 96, 800, 800])
    state = tmp_path / "state"
    logs = [tmp_path / "aggregator.log", *(tmp_path / f"client{i}.log" for i in range(5))]
    aggregator = start_aggregator(
        minilm_bundle, mosquitto.url, state, logs[0], "--federation", "vanish", "--rounds", "5",
        "--clients-per-round", "5", "--min-clients", "3", "--min-online", "5", "--round-timeout", "90", "--steps", "12",
    )
    start = lambda i: start_client(minilm_bundle, mosquitto.url, "vanish", shards[i], f"dev{i}", tmp_path / "c",  # noqa: E731
                                   logs[i + 1], "--threads", "1", "--profile", "mid")
    clients = [start(i) for i in range(5)]
    wait_for(lambda: (state / "state.json").exists() and
             json.loads((state / "state.json").read_text())["task"] is not None, 300, "round 1 to open")
    for i in (3, 4):
        os.kill(clients[i].pid, signal.SIGKILL)
        clients[i].wait()
    wait_for(lambda: len(read_metrics(state)) >= 1, 120, "round 1 to close")
    first = read_metrics(state)[0]
    assert first["participants"] == ["dev0", "dev1", "dev2"] and first["dropouts"] == ["dev3", "dev4"]
    assert first["round_seconds"] < 80, "the last wills showed the killed devices offline: no wait for the deadline"
    statuses = _retained(mosquitto.url, "fedpeft/vanish/clients/+/status")
    assert statuses["fedpeft/vanish/clients/dev4/status"]["state"] == "offline"
    clients[3] = start(3)
    finish([aggregator, *clients[:4]], 600, logs)
    rounds = read_metrics(state)
    assert len(rounds) == 5
    assert "dev3" in sum((r["participants"] for r in rounds[1:]), []), "the restarted device (~12 s to profile and " \
        "rejoin) takes part in a later round: " + str([r["participants"] for r in rounds])


def test_broker_restart_mid_round_everyone_reconnects_and_the_round_completes(minilm_bundle, mosquitto, tmp_path):
    pool, _ = rotten_tomatoes_split()
    shards = write_shards(tmp_path / "data", pool, [96, 96, 400])
    state = tmp_path / "state"
    logs = [tmp_path / "aggregator.log", *(tmp_path / f"client{i}.log" for i in range(3))]
    aggregator = start_aggregator(
        minilm_bundle, mosquitto.url, state, logs[0], "--federation", "restart", "--rounds", "2",
        "--clients-per-round", "3", "--min-clients", "3", "--round-timeout", "300", "--epochs", "1",
    )
    clients = [start_client(minilm_bundle, mosquitto.url, "restart", shards[i], f"dev{i}", tmp_path / "c", logs[i + 1],
                            "--threads", "1", "--profile", "mid") for i in range(3)]
    updates = state / "rounds" / "0001" / "updates"
    wait_for(lambda: updates.is_dir() and any(updates.glob("*.fpa")), 300, "a first update of round 1")
    mosquitto.stop()
    time.sleep(2)
    mosquitto.start()
    finish([aggregator, *clients], 600, logs)
    rounds = read_metrics(state)
    assert [r["participants"] for r in rounds] == [["dev0", "dev1", "dev2"]] * 2


def test_restarted_clients_resume_the_open_round_and_never_upload_twice(minilm_bundle, mosquitto, tmp_path):
    pool, _ = rotten_tomatoes_split()
    shards = write_shards(tmp_path / "data", pool, [32, 480])
    state = tmp_path / "state"
    logs = [tmp_path / "aggregator.log", tmp_path / "client0.log", tmp_path / "client1.log"]
    aggregator = start_aggregator(
        minilm_bundle, mosquitto.url, state, logs[0], "--federation", "resume", "--rounds", "1",
        "--clients-per-round", "2", "--min-clients", "2", "--round-timeout", "300", "--epochs", "1",
    )
    start = lambda i: start_client(minilm_bundle, mosquitto.url, "resume", shards[i], f"dev{i}", tmp_path / "c",  # noqa: E731
                                   logs[i + 1], "--threads", "1", "--profile", "mid")
    clients = [start(0), start(1)]
    first = state / "rounds" / "0001" / "updates" / "dev0.fpa"
    wait_for(first.exists, 300, "dev0's update")
    for process in clients:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (state / "rounds" / "0001" / "updates" / "dev1.fpa").exists(), "dev1 must be killed mid-training"
    clients = [start(0), start(1)]
    finish([aggregator, *clients], 600, logs)
    (record,) = read_metrics(state)
    assert record["participants"] == ["dev0", "dev1"]
    assert record["rejected"] == 0, record["rejected_reasons"]
    assert "round 1 uploaded" not in logs[1].read_text().split("dev0 joined")[-1], "dev0 uploaded twice"


def test_fedpeft_client_federates_an_image_bundle_from_a_npz_file(mosquitto, tmp_path) -> None:
    """Images as a device holds them (a .npz of Fashion-MNIST arrays), a small ViT bundle, real mosquitto."""
    from click.testing import CliRunner
    from transformers import ViTConfig, ViTForImageClassification

    from edge_sdk.datasets import fashion_mnist
    from export.cli import main as export_cli

    model_dir, bundle = tmp_path / "vit", tmp_path / "bundle"
    ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         num_labels=10)).save_pretrained(model_dir)
    exported = CliRunner().invoke(export_cli, ["--out", str(bundle), "--model", str(model_dir), "--task", "img-cls",
                                               "--ranks", "2,4", "--num-labels", "10"])
    assert exported.exit_code == 0, exported.output
    images = fashion_mnist("test", limit=96)
    data = tmp_path / "images.npz"
    np.savez(data, images=np.stack([e.x for e in images]), labels=np.array([e.label for e in images]))
    logs = [tmp_path / "aggregator.log", tmp_path / "device.log"]
    aggregator = start_aggregator(bundle, mosquitto.url, tmp_path / "state", logs[0], "--federation", "images",
                                  "--rounds", "1", "--clients-per-round", "1", "--min-clients", "1", "--steps", "2",
                                  "--round-timeout", "300")
    device = start_client(bundle, mosquitto.url, "images", data, "camera-1", tmp_path / "c", logs[1], "--threads", "1")
    finish([aggregator, device], 300, logs)
    (record,) = read_metrics(tmp_path / "state")
    assert record["participants"] == ["camera-1"] and record["samples"] == 96
