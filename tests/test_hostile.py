"""Hostile devices that send well-formed updates: self-reported counts and tiers are bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.bounds import NORM_CAP, SHARE_CAP, capped_shares
from aggregator.round_merge import SAMPLE_CAP, bounded_counts, merge_round
from edge_sdk.protocol import Adapter, AdapterHeader
from edge_sdk.protocol.manifest import read_manifest


def test_counts_are_clipped_to_the_cap_times_the_low_median() -> None:
    assert bounded_counts([50, 60, 70, 10**18]) == [50, 60, 70, int(SAMPLE_CAP * 60)]
    assert bounded_counts([50, 10**6]) == [50, 200], "with two clients the lower one sets the bound"
    assert bounded_counts([30, 80, 120], cap=4.0) == [30, 80, 120], "honest size skew is untouched"
    assert bounded_counts([]) == []


def test_shares_are_clipped_to_the_cap_times_the_low_median_and_sum_to_one() -> None:
    np.testing.assert_allclose(capped_shares(np.array([0.1, 0.1, 0.1, 0.7])), [0.2, 0.2, 0.2, 0.4])
    np.testing.assert_allclose(capped_shares(np.array([0.3, 0.3, 0.4])), [0.3, 0.3, 0.4])
    rows = capped_shares(np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(rows, [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), "a zero median leaves the row"


def test_a_device_claiming_a_million_samples_weighs_as_the_cap_allows(minilm_bundle: Path, trained_adapters) -> None:
    """Its weight share falls from 99.9% to at most SHARE_CAP / (SHARE_CAP + k − 1) of every layer and of the head."""
    manifest = read_manifest(minilm_bundle)
    honest, hostile = trained_adapters["r8-0"], trained_adapters["r8-1"]

    def merged(claim: int):
        updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", 8, 100), honest) for i in range(3)}
        updates["mallory"] = (AdapterHeader("f", 1, "mallory", 8, claim), hostile)
        return merge_round("svd-weighted", updates, manifest)

    (tiers, result), (capped_tiers, capped) = merged(10**6), merged(int(SAMPLE_CAP * 100))
    share = max(w["mallory"] for w in result.weights.values())
    assert share <= SHARE_CAP / (SHARE_CAP + 3) + 1e-9, share
    for layer, weights in result.weights.items():
        assert weights == capped.weights[layer]
    for name, value in tiers[8].head.items():
        np.testing.assert_array_equal(value, capped_tiers[8].head[name])


def test_an_update_scaled_a_thousandfold_weighs_as_the_norm_cap_allows(minilm_bundle: Path, trained_adapters) -> None:
    """Its ‖ΔW‖ counts at most NORM_CAP × the round's low median, in the weights and in the merge: its share
    falls from ~99% to at most cap / (cap + k − 1), and the merged ΔW_g stays within the honest scale."""
    manifest = read_manifest(minilm_bundle)
    honest, other = trained_adapters["r8-0"], trained_adapters["r8-1"]
    loud = Adapter(8, {k: (a, b * 1000.0) for k, (a, b) in other.lora.items()}, other.head)
    updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", 8, 100), honest) for i in range(3)}
    updates["mallory"] = (AdapterHeader("f", 1, "mallory", 8, 100), loud)
    _, result = merge_round("svd-weighted", updates, manifest)
    cap = NORM_CAP / (NORM_CAP + 3)
    for layer, weights in result.weights.items():
        assert weights["mallory"] <= cap + 1e-9, (layer, weights)
        a, b = honest.lora[layer]
        honest_norm = np.linalg.norm(manifest.lora.alpha / 8 * b.astype(np.float64) @ a)
        assert np.linalg.norm(result.global_state[layer].dense()) <= NORM_CAP * honest_norm * (1 + 1e-6)


@pytest.mark.parametrize("strategy", ["fedavg-naive", "hetlora", "ffa-lora"])
def test_factor_merges_bound_a_thousandfold_b_like_the_exact_ones(minilm_bundle: Path, trained_adapters, strategy) -> None:
    """The padded and frozen-A merges scale each B (and A) to at most NORM_CAP × the round's low median
    norm before averaging: the merged B stays within NORM_CAP × the honest one (unclipped: ~250×)."""
    manifest = read_manifest(minilm_bundle)
    honest = trained_adapters["r8-0"]
    loud = Adapter(8, {k: (a, b * 1000.0) for k, (a, b) in honest.lora.items()}, honest.head)
    updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", 8, 100), honest) for i in range(3)}
    updates["mallory"] = (AdapterHeader("f", 1, "mallory", 8, 100), loud)
    tiers, result = merge_round(strategy, updates, manifest)
    assert not result.rejected
    for layer, (a, b) in honest.lora.items():
        merged_a, merged_b = tiers[8].lora[layer]
        assert np.linalg.norm(merged_b) <= NORM_CAP * np.linalg.norm(b) * (1 + 1e-6), layer
        assert np.linalg.norm(merged_a) <= NORM_CAP * np.linalg.norm(a) * (1 + 1e-6), layer
        assert max(result.weights[layer].values()) <= NORM_CAP / (NORM_CAP + 3) + 1e-9


@pytest.mark.slow
def test_one_attacker_among_ten_moves_the_global_less_than_two_points(minilm_bundle: Path) -> None:
    """One round from a global that has learned (central steps first) with ten devices training a few steps
    each. The tenth turns hostile: it claims 10^6 samples, or sends its update ×1000, or trains on flipped
    labels and sends that ×10, or does both. Each time svd-weighted's merged global stays within 2 points of
    the round in which the tenth device was honest (the same 400 held-out reviews)."""
    from edge_sdk.data import Example, stratified_split
    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.trainer import Trainer

    manifest = read_manifest(minilm_bundle)
    pool, test = stratified_split(rotten_tomatoes(), test_fraction=0.2, seed=0)
    test = test[:400]
    trainer = Trainer(minilm_bundle, 8, threads=2)
    trainer.fit(pool[2000:3600], steps=80, batch_size=16, lr=4e-3, seed=0)
    before, start = trainer.evaluate(test).accuracy, trainer.state()

    def local(shard: list[Example], seed: int) -> Adapter:
        trainer.load_state(start)
        trainer.reset_optimizer()
        trainer.fit(shard, steps=4, batch_size=16, lr=2e-3, seed=seed)
        return trainer.get_adapter()

    def correct(attack: tuple[Adapter, int]) -> int:
        updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", 8, 128), a) for i, a in enumerate(honest)}
        updates["mallory"] = (AdapterHeader("f", 1, "mallory", 8, attack[1]), attack[0])
        tiers, _ = merge_round("svd-weighted", updates, manifest)
        trainer.load_state(start)
        trainer.set_adapter(tiers[8])
        return round(trainer.evaluate(test).accuracy * len(test))

    def scaled(adapter: Adapter, factor: float) -> Adapter:
        return Adapter(adapter.rank, {k: (a, b * factor) for k, (a, b) in adapter.lora.items()}, adapter.head)

    shards = [pool[i * 128:(i + 1) * 128] for i in range(10)]
    honest = [local(shard, i) for i, shard in enumerate(shards[:9])]
    mallory, flipped = local(shards[9], 9), local([Example(e.x, 1 - e.label) for e in shards[9]], 9)
    clean = correct((mallory, 128))
    assert before >= 0.7 and clean >= 0.7 * len(test), (before, clean)
    attacks = {"10^6 samples": (mallory, 10**6), "update ×1000": (scaled(mallory, 1000.0), 128),
               "flipped labels ×10": (scaled(flipped, 10.0), 128),
               "flipped labels ×10, 10^6 samples": (scaled(flipped, 10.0), 10**6)}
    lost = {name: (clean - correct(attack)) / len(test) for name, attack in attacks.items()}
    assert all(points <= 0.02 for points in lost.values()), (clean / len(test), lost)


@pytest.mark.parametrize("factor", [1000.0, -1000.0])
def test_trimmed_mean_keeps_every_entry_within_the_honest_range(minilm_bundle: Path, trained_adapters, factor) -> None:
    """One of five devices sends an honest update ×1000 (or flipped ×−1000): trimmed-mean drops it from every
    entry of every layer, so ΔW_g stays entrywise between the honest devices' ΔW_i."""
    manifest = read_manifest(minilm_bundle)
    honest = [trained_adapters["r8-0"], trained_adapters["r8-1"]] * 2
    loud = Adapter(8, {k: (a, b * factor) for k, (a, b) in honest[0].lora.items()}, honest[0].head)
    updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", 8, 100), adapter) for i, adapter in enumerate(honest)}
    updates["mallory"] = (AdapterHeader("f", 1, "mallory", 8, 100), loud)
    _, result = merge_round("trimmed-mean", updates, manifest)
    scaling = manifest.lora.alpha / 8
    for layer in honest[0].lora:
        deltas = np.stack([scaling * h.lora[layer][1].astype(np.float64) @ h.lora[layer][0] for h in honest[:2]])
        merged = result.global_state[layer].dense().astype(np.float64)
        assert (merged >= deltas.min(axis=0) - 1e-5).all() and (merged <= deltas.max(axis=0) + 1e-5).all(), layer
        assert result.weights[layer]["mallory"] < 0.05, result.weights[layer]


def test_an_update_that_breaks_the_merge_is_quarantined_and_the_round_closes(minilm_bundle: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """Fault injection: the merge raises whenever mallory's update is in it (as a NaN-producing update once
    did, crashing the aggregator into a restart loop). The round closes without it, mallory is told, and its
    update is kept aside where a restart does not load it."""
    from dataclasses import replace

    from aggregator.broker import EmbeddedBroker
    from aggregator.state import StateDir
    from aggregator.strategies import STRATEGIES
    from edge_sdk.client import FederatedClient
    from edge_sdk.datasets import shard
    from edge_sdk.protocol import TrainingConfig
    from tests.federation import aggregator_thread, rotten_tomatoes_split, run_until_finished

    honest = STRATEGIES["svd-weighted"]

    def fragile(updates, layers, ranks, **options):
        if any(u.client_id == "mallory" for u in updates):
            raise FloatingPointError("overflow in the Gram matrix")
        return honest.merge(updates, layers, ranks, **options)

    monkeypatch.setitem(STRATEGIES, "svd-weighted", replace(honest, merge=fragile))
    pool, _ = rotten_tomatoes_split()
    names = ["dev0", "dev1", "mallory"]
    with EmbeddedBroker() as broker:
        aggregator, agg_thread, errors = aggregator_thread(
            minilm_bundle, broker.settings, tmp_path / "state", "quarantine", rounds=1, clients_per_round=3,
            min_clients=2, min_online=3, round_timeout=120, training=TrainingConfig(steps=2, batch_size=8),
        )
        clients = [FederatedClient(minilm_bundle, broker.settings, "quarantine", data=shard(pool, i, 3)[:32],
                                   client_id=name, threads=1, state_dir=tmp_path / "clients")
                   for i, name in enumerate(names)]
        run_until_finished(clients, agg_thread)
    assert not agg_thread.is_alive() and not errors, errors
    (record,) = aggregator.records
    assert record.participants == ["dev0", "dev1"]
    assert "made the merge fail (FloatingPointError: overflow in the Gram matrix)" in record.rejected_reasons["mallory"]
    store = StateDir(tmp_path / "state")
    assert sorted(store.updates(1)) == ["dev0", "dev1"]
    assert (store.round_dir(1) / "quarantine" / "mallory.fpa").is_file()


def test_chunk_floods_at_qos_0_and_1_leave_the_aggregators_memory_flat(minilm_bundle: Path, mosquitto,
                                                                        tmp_path: Path) -> None:
    """600 MiB of chunk frames from one logged-in device on its own update topic, half at QoS 0 (no flow control,
    dropped on arrival) and half at QoS 1 (paced by the broker's in-flight window, each handled and acknowledged):
    the aggregator's resident memory grows by at most 100 MB and it keeps running."""
    import os
    import time

    import paho.mqtt.client as mqtt
    import psutil
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_sdk.protocol import Topics, split_payload
    from tests.federation import start_aggregator, wait_for

    log = tmp_path / "aggregator.log"
    aggregator = start_aggregator(minilm_bundle, mosquitto.url, tmp_path / "state", log, "--federation", "flood",
                                  "--rounds", "1", "--min-clients", "2", "--min-online", "3")
    wait_for(lambda: "waiting for clients" in log.read_text(), 120, "the aggregator to wait for clients")
    process = psutil.Process(aggregator.pid)
    time.sleep(1)
    before = process.memory_info().rss
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory")
    attacker.connect("127.0.0.1", mosquitto.port)
    attacker.loop_start()
    topic = Topics("flood").update("mallory")
    frames = split_payload(os.urandom(300 << 20), chunk_size=1 << 20)
    infos = [attacker.publish(topic, frame, qos=qos) for qos in (0, 1) for frame in frames[:300]]
    for info in infos:
        info.wait_for_publish(120)
    wait_for(lambda: aggregator.poll() is not None or "dropped 1 QoS 0 messages" in log.read_text(), 60,
             "the aggregator to report the QoS 0 flood")
    time.sleep(3)
    growth = process.memory_info().rss - before
    attacker.loop_stop()
    attacker.disconnect()
    assert aggregator.poll() is None, log.read_text()[-2000:]
    aggregator.terminate()
    aggregator.wait(30)
    assert growth <= 100 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
