"""ffa-lora end to end: an export with one frozen A shared by all tiers, devices training B only, the strategy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.round_merge import check_strategy
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer
from tests.conftest import TEST_RANKS
from tests.federation import two_tier_simulation


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
def test_ffa_lora_federation_accepts_every_update_and_learns(frozen_a_bundle: Path, mosquitto, tmp_path: Path) -> None:
    summary, rows, records = two_tier_simulation(frozen_a_bundle, "ffa-lora", mosquitto.url, tmp_path / "run")

    assert {int(r) for r in summary["ranks"]} == set(TEST_RANKS), "both tiers take part"
    assert all(row["participants"] == 3 for row in rows[1:]), rows
    assert all(record["rejected"] == 0 for record in records), records
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.05, [r["central_accuracy"] for r in rows]
