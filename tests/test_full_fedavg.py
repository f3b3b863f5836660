"""The full fine-tuning baseline: a `--full-finetune` export trains every weight; FedAvg averages them all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aggregator.round_merge import check_strategy
from aggregator.traffic import model_parameters
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.peft_format import write_peft_adapter
from edge_sdk.protocol import TrainingConfig
from edge_sdk.protocol.manifest import BundleError, read_manifest
from edge_sdk.trainer import Trainer
from fedpeft_sim.full_fedavg import run_full_fedavg
from fedpeft_sim.simulation import SimConfig

SENTENCES = rotten_tomatoes()[:32]


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "full"
    export_bundle(out, ExportOptions(ranks=(2,), full_finetune=True))
    return out


def test_every_weight_but_the_embeddings_trains_and_lora_stays_zero(full_bundle: Path, minilm_bundle: Path,
                                                                     tmp_path: Path) -> None:
    manifest, lora_manifest = read_manifest(full_bundle), read_manifest(minilm_bundle)
    base = load_file(str(minilm_bundle / lora_manifest.base_weights["file"]))
    embeddings = {name for name in base if name.endswith("_embeddings.weight")}
    trainable = set(manifest.tiers[0].trainable)
    assert len(embeddings) == 3 and trainable & set(base) == set(base) - embeddings
    assert trainable - set(base) == {"m.classifier.weight", "m.classifier.bias"}

    trainer = Trainer(full_bundle, 2, threads=2)
    before = trainer.state()
    trainer.fit(SENTENCES, steps=2, batch_size=16, lr=1e-4)
    after = trainer.state()
    moved = {name for name in base if name in after and not np.array_equal(before[name], after[name])}
    assert moved == set(base) - embeddings, "the LoRA bundle's frozen base trains here, but the embeddings"
    for pair in manifest.lora_pairs:
        assert not after[pair.b].any()

    with pytest.raises(ValueError, match="--full-finetune"):
        check_strategy("fedavg-naive", manifest)
    with pytest.raises(BundleError, match="--full-finetune"):
        write_peft_adapter(trainer.get_adapter(), manifest, tmp_path / "adapter")


@pytest.mark.slow
def test_full_fedavg_learns_and_counts_whole_model_traffic(full_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = SimConfig(bundle=full_bundle, out=out, strategy="full-fedavg", clients=6, fraction=0.5, rounds=2,
                       seed=1, training=TrainingConfig(steps=25, batch_size=16, lr=1e-4),
                       eval_samples=300, final_samples=600, local_eval_every=2, pool_limit=900)
    summary = run_full_fedavg(config)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    manifest = read_manifest(full_bundle)
    trained = manifest.tiers[0].trainable_count
    for row in rows[1:]:
        assert row["participants"] == 3 and row["bytes_up"] == 3 * 4 * trained
    assert summary["up_ratio_to_full_fedavg"] == pytest.approx(trained / model_parameters(manifest))
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.05, [r["central_accuracy"] for r in rows]


def test_a_bundle_whose_portable_gradients_do_not_match_ships_without_a_portable_graph(full_bundle: Path) -> None:
    """Every weight trains here and the lowered backward does not reproduce onnxruntime-training's gradients
    (issue 19): the export keeps the tier trainable on onnxruntime-training and leaves the portable graph out."""
    from edge_sdk.protocol.manifest import read_manifest

    tier = read_manifest(full_bundle).tier(2)
    assert tier.portable_model is None and tier.portable_max_rel_diff is None
    assert not (full_bundle / tier.dir / "portable_model.onnx").exists()
