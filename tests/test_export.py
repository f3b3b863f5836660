"""fedpeft-export on the real MiniLM-L6 weights: manifest, trainable set, parity, sharing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.bundle import open_tier
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.encoders import TextEncoder
from edge_sdk.files import sha256_file
from edge_sdk.peft_format import write_peft_adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer
from export.cli import main as export_cli
from export.model import load_lora_model, resolve_model_dir
from tests.conftest import TEST_RANKS

HIDDEN = 384
LAYERS = 6
HEAD = HIDDEN * 2 + 2


def test_manifest_describes_lora_only_tiers(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    assert manifest.ranks == list(TEST_RANKS)
    assert manifest.lora.target_modules == ["query", "value"]
    for tier in manifest.tiers:
        r = tier.rank
        assert len(tier.lora_pairs) == 2 * LAYERS
        for pair in tier.lora_pairs:
            assert pair.a_shape == [r, HIDDEN] and pair.b_shape == [HIDDEN, r]
            assert pair.scaling == pytest.approx(manifest.lora.alpha / r)
            assert pair.layer.endswith((".query", ".value"))
        lora = {name for p in tier.lora_pairs for name in (p.a, p.b)}
        head = set(tier.trainable) - lora
        assert head == {"m.classifier.modules_to_save.default.weight", "m.classifier.modules_to_save.default.bias"}
        assert tier.trainable_count == 2 * LAYERS * r * 2 * HIDDEN + HEAD
        assert set(manifest.peft_keys) == set(tier.trainable)
        assert tier.parity_max_abs_diff is not None and tier.parity_max_abs_diff <= 1e-4


def test_peft_keys_are_the_keys_peft_writes(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    keys = set(manifest.peft_keys.values())
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    assert not any(".default." in key for key in keys)


def test_base_weights_stored_once(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    files = [p for p in minilm_bundle.rglob("*") if p.is_file()]
    large = [p for p in files if p.stat().st_size > 5_000_000]
    assert large == [minilm_bundle / "base_weights.safetensors"]
    assert sha256_file(large[0]) == manifest.base_weights["sha256"]
    base = load_file(str(large[0]))
    assert sum(v.size for v in base.values()) == manifest.base_weights["parameters"] > 22_000_000
    assert not any(name in base for name in manifest.tiers[0].trainable)
    for tier in manifest.tiers:
        tier_bytes = sum(p.stat().st_size for p in (minilm_bundle / tier.dir).iterdir())
        assert tier_bytes < 3_000_000
        assert not (minilm_bundle / tier.dir / "checkpoint").exists()


def test_trainable_parameters_are_graph_parameters_with_gradients(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    for tier in manifest.tiers:
        training = onnx.load(str(minilm_bundle / tier.dir / tier.training_model))
        inputs = {i.name for i in training.graph.input}
        outputs = {o.name for o in training.graph.output}
        assert set(tier.trainable) <= inputs
        assert {f"{name}_grad.accumulation.out" for name in tier.trainable} <= outputs
        opened = open_tier(minilm_bundle, tier.rank)
        requires_grad = {name for name, param in opened.state.parameters if param.requires_grad}
        assert requires_grad == set(tier.trainable)


def test_ort_logits_match_a_fresh_peft_model_on_real_sentences(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    examples = rotten_tomatoes()[:8]
    feeds = TextEncoder(minilm_bundle, manifest)(examples)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert mask.min() == 0, "the batch should contain padding"
    for rank in TEST_RANKS:
        loaded = load_lora_model(resolve_model_dir(None), "seq-cls", rank, manifest.lora.alpha, None, True, 2)
        with torch.no_grad():
            reference = loaded.wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        opened = open_tier(minilm_bundle, rank)
        opened.module.eval()
        _, logits = opened.run([ids, mask], np.zeros(len(examples), dtype=np.int64))
        assert np.max(np.abs(logits - reference)) < 1e-4


def test_cli_no_train_head_trains_lora_only(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(out), "--ranks", "4", "--no-train-head"])
    assert result.exit_code == 0, result.output
    assert "r=4" in result.output
    tier = read_manifest(out).tier(4)
    assert all(".lora_A." in n or ".lora_B." in n for n in tier.trainable)
    assert len(tier.trainable) == 2 * 2 * LAYERS
    assert tier.trainable_count == 2 * LAYERS * 4 * 2 * HIDDEN


def test_cli_scaling_gives_every_tier_one_scaling_that_the_aggregator_reads(tmp_path: Path, minilm_bundle: Path) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(out), "--ranks", "2,4", "--scaling", "2", "--no-train-head"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.lora.scaling == 2.0
    assert {pair.scaling for tier in manifest.tiers for pair in tier.lora_pairs} == {2.0}
    assert all(tier.parity_max_abs_diff is not None and tier.parity_max_abs_diff <= 1e-4 for tier in manifest.tiers)
    specs = layer_specs_from_manifest(manifest)
    assert all(spec.scaling(2) == spec.scaling(4) == 2.0 for spec in specs.values())
    adapter = Trainer(out, 4, threads=1).get_adapter()
    config = json.loads((write_peft_adapter(adapter, manifest, tmp_path / "peft") / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0, "peft's alpha / r must give the tier's scaling 2"
    standard = layer_specs_from_manifest(read_manifest(minilm_bundle))
    assert all(spec.scaling(2) == 8.0 and spec.scaling(8) == 2.0 for spec in standard.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", "sentence-transformers/all-MiniLM-L6-v2"], "hub id"),
        (["--ranks", "0"], "positive integers"),
        (["--ranks", "2,x"], "comma-separated list of integers"),
        (["--ranks", "-4"], "positive integers"),
        (["--scaling", "0"], "positive number"),
        (["--task", "speech"], "Invalid value for '--task'"),
        (["--target-modules", "q,v"], "Linear module names: classifier, dense, key, query, value"),
    ],
)
def test_cli_rejects_bad_input_and_leaves_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(out), "--ranks", "2", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = CliRunner().invoke(export_cli, ["--out", str(tmp_path / "b"), "--model", str(folder)])
    assert result.exit_code != 0 and "not a Hugging Face transformers model folder" in result.output


def test_existing_bundle_needs_force_and_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(export_cli, ["--out", str(out), "--ranks", "2"]).exit_code == 0
    first = (out / "manifest.json").read_text()
    refused = runner.invoke(export_cli, ["--out", str(out), "--ranks", "4"])
    assert refused.exit_code != 0 and "--force" in refused.output
    assert (out / "manifest.json").read_text() == first
    failed = runner.invoke(export_cli, ["--out", str(out), "--ranks", "4", "--target-modules", "nope", "--force"])
    assert failed.exit_code != 0
    assert (out / "manifest.json").read_text() == first, "a failed --force export must keep the old bundle"
    replaced = runner.invoke(export_cli, ["--out", str(out), "--ranks", "4", "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert read_manifest(out).ranks == [4]
    assert not (out / "tiers" / "r2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _tiny_model(folder: Path, config) -> Path:
    config.save_pretrained(str(folder))
    return folder


def test_img_cls_vit_exports_with_parity(tmp_path: Path) -> None:
    from transformers import ViTConfig

    model = _tiny_model(tmp_path / "vit", ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(out), "--model", str(model), "--task", "img-cls",
                                             "--num-labels", "10", "--ranks", "2,4"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.lora.target_modules == ["q_proj", "v_proj"]
    assert manifest.base_model["random_init"] is True
    assert manifest.embedding_lookup is None
    assert [t.parity_max_abs_diff <= 1e-4 for t in manifest.tiers] == [True, True]
    assert [t.portable_max_rel_diff <= 1e-5 for t in manifest.tiers] == [True, True], "portable ViT gradients"
    opened = open_tier(out, 4)
    optimizer = opened.new_optimizer()
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    losses = []
    for _ in range(5):
        loss, _ = opened.run([pixels], labels)
        optimizer.step()
        opened.module.lazy_reset_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_llama_exports_lora_only(tmp_path: Path, tied: bool) -> None:
    """An output layer that reuses the token-embedding table keeps the lookup inside the graphs."""
    import shutil

    from transformers import LlamaConfig

    model = _tiny_model(tmp_path / "llama", LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, max_position_embeddings=128,
                                                        tie_word_embeddings=tied))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir(None) / name, model / name)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(out), "--model", str(model), "--task", "causal-lm",
                                             "--ranks", "2"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    tier = manifest.tier(2)
    assert tier.parity_max_abs_diff <= 1e-4
    assert tier.portable_model is not None and tier.portable_max_rel_diff <= 1e-5, \
        "RMS norm, SiLU, rotary slices and grouped-query splits lower to standard operators"
    assert manifest.embedding_lookup == (None if tied else {"table": "m.model.embed_tokens.weight",
                                                            "ids": "input_ids", "input": "input_ids.embedded"})
    assert all(".lora_" in name for name in tier.trainable)
    assert manifest.label_input.axes == ["tokens"]
    assert json.loads((out / "manifest.json").read_text())["lora"]["ignore_index"] == -100
