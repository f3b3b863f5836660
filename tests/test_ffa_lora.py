"""ffa-lora end to end: an export with one frozen A shared by all tiers, devices training B only, the strategy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.round_merge import check_strategy
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.manifest import read_manifest
from edge_sdk.protocol import TrainingConfig
from edge_sdk.rank import RankPolicy
from edge_sdk.trainer import Trainer
from examples.sim.simulation import SimConfig, run_simulation
from tests.conftest import TEST_RANKS


@pytest.fixture(scope="module")
def frozen_a_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "frozen-a"
    export_bundle(out, ExportOptions(ranks=TEST_RANKS, freeze_lora_a=True))
    return out


def test_tiers_share_one_frozen_a_and_devices_train_b_only(frozen_a_bundle: Path) -> None:
    manifest = read_manifest(frozen_a_bundle)
    low, high = (Trainer(frozen_a_bundle, r, threads=1) for r in TEST_RANKS)
    for tier in manifest.tiers:
        assert not any("lora_A" in name for name in tier.trainable)
        assert sum("lora_B" in name for name in tier.trainable) == len(tier.lora_pairs)
    low_a, high_a = low.get_adapter(), high.get_adapter()
    for layer, (a, b) in low_a.lora.items():
        np.testing.assert_array_equal(a, high_a.lora[layer][0][: TEST_RANKS[0]])
        assert np.abs(a).max() > 0 and not b.any()

    high.fit(rotten_tomatoes()[:64], steps=4, batch_size=16, lr=1e-2)
    trained = high.get_adapter()
    for layer, (a, b) in trained.lora.items():
        np.testing.assert_array_equal(a, high_a.lora[layer][0])
        assert b.any()

    moved = type(trained)(rank=trained.rank, lora={k: (a + 1.0, b) for k, (a, b) in trained.lora.items()},
                          head=trained.head)
    high.set_adapter(moved)
    for layer, (a, b) in high.get_adapter().lora.items():
        np.testing.assert_array_equal(a, high_a.lora[layer][0])
        np.testing.assert_array_equal(b, trained.lora[layer][1])


def test_strategy_and_bundle_must_match(frozen_a_bundle: Path, minilm_bundle: Path) -> None:
    check_strategy("ffa-lora", read_manifest(frozen_a_bundle))
    with pytest.raises(ValueError, match="--freeze-lora-a"):
        check_strategy("ffa-lora", read_manifest(minilm_bundle))
    with pytest.raises(ValueError, match="--freeze-lora-a"):
        check_strategy("svd-weighted", read_manifest(frozen_a_bundle))


@pytest.mark.slow
def test_ffa_lora_federation_accepts_every_update_and_learns(frozen_a_bundle: Path, mosquitto, tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = SimConfig(
        bundle=frozen_a_bundle, out=out, strategy="ffa-lora", clients=6, fraction=0.5, rounds=3, alpha=1.0,
        size_skew=0.5, dropout=0.0, seed=1, training=TrainingConfig(steps=25, batch_size=16, lr=2e-3,
                                                                      schedule="constant"),
        eval_samples=300, local_eval_every=3, pool_limit=900, broker_url=mosquitto.url,
        rank_policy=RankPolicy.balanced(max(TEST_RANKS), 2048 * 2**20, 0.1, 50),
    )
    summary = run_simulation(config)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {int(r) for r in summary["ranks"]} == set(TEST_RANKS), "both tiers take part"
    for row in rows[1:]:
        round_metrics = json.loads((out / "state" / "rounds" / f"{row['round']:04d}" / "metrics.json").read_text())
        assert row["participants"] == 3 and round_metrics["rejected"] == 0, round_metrics
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.05, [r["central_accuracy"] for r in rows]
