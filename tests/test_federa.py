"""FeDeRA (`--svd-init`): LoRA initialized from the pretrained weights' SVD over one shared residual base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.peft_format import write_peft_adapter
from edge_sdk.protocol.manifest import BundleError, read_manifest
from edge_sdk.trainer import Trainer
from tests.conftest import TEST_RANKS, peft_logits
from tests.federation import two_tier_simulation

SENTENCES = rotten_tomatoes()[:64]


@pytest.fixture(scope="module")
def svd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "svd-init"
    export_bundle(out, ExportOptions(ranks=TEST_RANKS, svd_init=True))
    return out


def _logits(trainer: Trainer) -> np.ndarray:
    trainer.opened.module.eval()
    feeds = trainer.encoder(SENTENCES[:8])
    _, logits = trainer.opened.run([feeds["input_ids"], feeds["attention_mask"]], np.zeros(8, np.int64))
    return logits


def test_every_tier_starts_at_the_pretrained_model_over_one_base(svd_bundle: Path, minilm_bundle: Path) -> None:
    manifest = read_manifest(svd_bundle)
    prefix = manifest.lora.svd_init.prefix_rank
    assert prefix == min(TEST_RANKS)
    plain = _logits(Trainer(minilm_bundle, TEST_RANKS[0], threads=1))
    low, high = (Trainer(svd_bundle, r, threads=1) for r in TEST_RANKS)
    for trainer in (low, high):
        np.testing.assert_allclose(_logits(trainer), plain, atol=1e-4)

    residual = load_file(str(svd_bundle / manifest.base_weights["file"]))
    original = load_file(str(minilm_bundle / manifest.base_weights["file"]))
    targets = {f"{pair.layer}.base_layer.weight" for pair in manifest.lora_pairs}
    assert targets <= set(residual)
    for name, value in original.items():
        if name not in targets:
            np.testing.assert_array_equal(residual[name], value)
    low_a, high_a = low.get_adapter(), high.get_adapter()
    low_scaling = manifest.tier(prefix).lora_pairs[0].scaling
    for pair in manifest.tier(max(TEST_RANKS)).lora_pairs:
        a, b = high_a.lora[pair.layer]
        np.testing.assert_allclose(low_a.lora[pair.layer][0] * low_scaling**0.5, a[:prefix] * pair.scaling**0.5,
                                   rtol=1e-5, atol=1e-7)
        assert not b[:, prefix:].any() and b[:, :prefix].any()
        weight = original[f"{pair.layer}.base_layer.weight"].astype(np.float64)
        singular = np.linalg.svd(weight, compute_uv=False)
        gram = (a.astype(np.float64) @ a.T.astype(np.float64)) * pair.scaling
        np.testing.assert_allclose(np.diag(gram), singular[: a.shape[0]], rtol=1e-4)
        moved = weight - residual[f"{pair.layer}.base_layer.weight"]
        np.testing.assert_allclose(np.linalg.svd(moved, compute_uv=False)[:prefix], singular[:prefix], rtol=1e-4)


def test_peft_adapter_converts_onto_the_original_base(svd_bundle: Path, tmp_path: Path) -> None:
    trainer = Trainer(svd_bundle, max(TEST_RANKS), threads=2)
    trainer.fit(SENTENCES, epochs=1, batch_size=16, lr=2e-3)
    with pytest.raises(BundleError, match="--svd-init"):
        write_peft_adapter(trainer.get_adapter(), trainer.manifest, tmp_path / "refused")
    folder = write_peft_adapter(trainer.get_adapter(), trainer.manifest, tmp_path / "adapter", svd_bundle)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == max(TEST_RANKS) + min(TEST_RANKS)
    reference = peft_logits(folder, trainer.encoder(SENTENCES[:8]))
    assert np.abs(reference - _logits(trainer)).max() < 1e-4


def test_svd_init_and_frozen_a_are_exclusive(tmp_path: Path) -> None:
    from export.bundle import ExportOptions, export_bundle
    from export.errors import ExportError

    with pytest.raises(ExportError, match="choose one"):
        export_bundle(tmp_path / "both", ExportOptions(ranks=TEST_RANKS, svd_init=True, freeze_lora_a=True))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_federa_federation_over_mixed_tiers_learns(svd_bundle: Path, mosquitto, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary, rows, records = two_tier_simulation(svd_bundle, "svd-weighted", mosquitto.url, out)

    assert {int(r) for r in summary["ranks"]} == set(TEST_RANKS), "both tiers take part"
    assert all(record["rejected"] == 0 for record in records), records
    assert (out / "state" / "rounds" / f"{rows[-1]['round']:04d}" / "peft" / "adapter_config.json").is_file()
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.05, [r["central_accuracy"] for r in rows]
