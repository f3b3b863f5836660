"""A small real simulation: SDK clients with profiles and tiers, the aggregator, mosquitto, real training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.protocol import TrainingConfig
from fedpeft_sim.rescore import rescore_run
from fedpeft_sim.simulation import SimConfig, run_simulation
from fedpeft_sim.summary import write_summary

pytestmark = pytest.mark.slow


def test_small_federation_learns_and_counts_bytes_from_real_payloads(minilm_bundle, mosquitto, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = SimConfig(
        bundle=minilm_bundle, out=out, clients=6, fraction=0.5, rounds=3, alpha=1.0, size_skew=0.5, dropout=0.2,
        seed=1, training=TrainingConfig(steps=12, batch_size=16, lr=4e-3, schedule="constant"), eval_samples=300,
        final_samples=600, local_eval_every=3, pool_limit=900, broker_url=mosquitto.url, rank_mix="round-robin",
    )
    summary = run_simulation(config)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.05, [r["central_accuracy"] for r in rows]
    for row in rows[1:]:
        updates = sorted((out / "state" / "rounds" / f"{row['round']:04d}" / "updates").glob("*.fpa"))
        assert row["participants"] == len(updates) >= 1
        assert row["bytes_up"] == sum(p.stat().st_size for p in updates) > 0
        assert row["participants"] + row["dropouts"] == 3, "half of six clients are sampled each round"
        assert row["full_fedavg_bytes"] > 100 * row["bytes_up"] and row["energy_joules"] > 0
    assert sum(r["dropouts"] for r in rows[1:]) >= 1, "seed 1 draws at least one dropout in three rounds"

    split = json.loads((out / "partition.json").read_text())["clients"]
    assert sum(c["train"] + c["test"] for c in split.values()) == 900
    assert summary["ranks"] == {2: 3, 8: 3}, "round-robin gives every tier its share, whatever the host measures"
    assert set(rows[-1]["local_accuracy_by_tier"]) == {c["preset"] for c in split.values()}
    assert set(rows[-1]["local_accuracy_by_rank"]) == {"2", "8"} and summary["low_high_rank_ratio"] > 0
    assert 0 <= summary["worst_client_accuracy"] <= summary["local_accuracy_mean"] <= 1
    assert all(0 <= r["central_roc_auc"] <= 1 for r in rows)

    rescored = rescore_run(out)
    assert [r["round"] for r in rescored] == [0, 1, 2, 3]
    assert [r["accuracy"] for r in rescored] == pytest.approx([r["central_accuracy"] for r in rows])
    assert [r["roc_auc"] for r in rescored] == pytest.approx([r["central_roc_auc"] for r in rows])
    closing = {r["central_samples"] for r in rows[1:]} | {r["samples"] for r in rescored[1:]}
    assert len(closing) == 1 and 500 < closing.pop() < 700, "each round of the closing window scores the 600-review subset"

    written = json.loads(write_summary(tmp_path / "summary.json", {"rotten-tomatoes": (
        {"svd-weighted_alpha1.0_float32_s1": (summary, rows), "svd-weighted_alpha1.0_int8_s0": (summary, rows)},
        {"accuracy": 0.8})}).read_text())["rotten-tomatoes"]
    assert written["centralized"] == {"accuracy": 0.8}
    entry = written["partitions"]["alpha1.0"]["svd-weighted"]
    assert entry["seeds"] == [1] and entry["config"] == json.loads(json.dumps(summary["config"]))
    assert entry["final_accuracy"] == {"mean": summary["final_accuracy"], "std": 0.0, "n": 1}
    assert entry["per_seed"][0]["bytes_up"] == summary["bytes_up"] > 0
    assert set(written["partitions"]["alpha1.0"]) == {"svd-weighted", "svd-weighted (int8)"}


def test_fashion_mnist_transfer_task_holds_only_the_classes_the_base_never_saw() -> None:
    from edge_sdk.datasets import fashion_mnist
    from fedpeft_sim.pretrain_vit import BASE_CLASSES
    from fedpeft_sim.simulation import load_data

    train, test = load_data("fashion-mnist-5-9")
    assert (len(train), len(test)) == (30000, 5000)
    assert sorted(set(e.label for e in train)) == sorted(set(e.label for e in test)) == [0, 1, 2, 3, 4]
    original = [e for e in fashion_mnist("test") if e.label not in BASE_CLASSES]
    assert all(np.array_equal(a.x, b.x) and a.label == b.label - 5 for a, b in zip(test, original))
    with pytest.raises(ValueError, match="rotten-tomatoes"):
        load_data("cifar")


def test_bundle_without_a_trainable_head_federates(mosquitto, tmp_path: Path) -> None:
    """A LoRA-only bundle (the head frozen at its initial values) has no head to share: no update is refused."""
    from export.bundle import ExportOptions, export_bundle

    bundle = tmp_path / "lora-only"
    export_bundle(bundle, ExportOptions(ranks=(2,), train_head=False))
    out = tmp_path / "run"
    run_simulation(SimConfig(
        bundle=bundle, out=out, clients=2, fraction=1.0, rounds=1, alpha=None, seed=0,
        training=TrainingConfig(steps=3, batch_size=8, lr=2e-3, schedule="constant"), eval_samples=50,
        final_samples=100, local_eval_every=1, pool_limit=200, broker_url=mosquitto.url,
    ))
    record = json.loads((out / "state" / "rounds" / "0001" / "metrics.json").read_text())
    assert len(record["participants"]) == 2 and record["rejected"] == 0, record


def test_own_text_file_runs_end_to_end_from_the_cli_and_bad_labels_stop_before_training(
        minilm_bundle, tmp_path: Path) -> None:
    """A user's JSON-lines file (real reviews written out here) runs as its own data set, on the simulator's own
    broker (generated logins); a CSV file of the same reviews reads to the same examples; a label the bundle's
    head has no class for is refused before any round."""
    from click.testing import CliRunner

    from edge_sdk.datasets import read_text_file, rotten_tomatoes
    from fedpeft_sim.cli import main as sim_cli

    reviews = rotten_tomatoes()[:400]
    mine = tmp_path / "my.jsonl"
    mine.write_text("".join(json.dumps({"text": e.x, "label": e.label}) + "\n" for e in reviews))
    table = tmp_path / "my.csv"
    import csv
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "text"])
        writer.writerows([e.label, e.x] for e in reviews)
    assert [(e.x, e.label) for e in read_text_file(table)] == [(e.x, e.label) for e in reviews]

    out = tmp_path / "run"
    args = ["run", "--bundle", str(minilm_bundle), "--out", str(out), "--clients", "4", "--fraction", "0.5",
            "--rounds", "2", "--steps", "2", "--eval-samples", "40", "--local-eval-every", "2", "--no-plot"]
    result = CliRunner().invoke(sim_cli, [*args, "--data", str(mine)])
    assert result.exit_code == 0, result.output
    assert "allow_anonymous false" in (out / "broker" / "mosquitto.conf").read_text(), "its own broker, logins only"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"] == str(mine) and summary["rounds"] == 2
    split = json.loads((out / "partition.json").read_text())["clients"]
    assert sum(c["train"] + c["test"] for c in split.values()) == 320, "80% of the 400 reviews go to the clients"

    shifted = tmp_path / "five.jsonl"
    shifted.write_text(mine.read_text().replace('"label": 1', '"label": 5'))
    refused = CliRunner().invoke(sim_cli, [*args, "--data", str(shifted)])
    assert refused.exit_code == 1 and "labels [5] outside the bundle's 2 classes" in refused.output
    assert not (out / "state").exists(), "nothing ran"
