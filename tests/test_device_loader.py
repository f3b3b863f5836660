"""The device side opens and trains a bundle with onnxruntime + numpy alone (torch unimportable)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_sdk.bundle import open_tier
from edge_sdk.manifest import BundleError
from tests.conftest import run_without_torch


def test_open_tier_without_torch_matches_inference_graph(minilm_bundle: Path) -> None:
    result = run_without_torch(f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        from edge_sdk.bundle import open_tier
        from edge_sdk.data import TextEncoder, rotten_tomatoes
        opened = open_tier({str(minilm_bundle)!r}, 8)
        encode = TextEncoder({str(minilm_bundle)!r}, opened.manifest)
        ids, mask = encode([e.text for e in rotten_tomatoes()[:6]])
        opened.module.eval()
        _, logits = opened.module(ids, mask, np.zeros(6, dtype=np.int64))
        tier = opened.manifest.tier(8)
        session = ort.InferenceSession({str(minilm_bundle)!r} + "/" + tier.dir + "/" + tier.inference_model)
        (reference,) = session.run(None, {{"input_ids": ids, "attention_mask": mask}})
        print(json.dumps({{"diff": float(np.abs(logits - reference).max()),
                          "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
    """)
    assert result == {"diff": pytest.approx(0.0, abs=1e-5), "torch": False, "transformers": False}


def test_training_without_torch_lowers_held_out_loss(minilm_bundle: Path) -> None:
    result = run_without_torch(f"""
        import json, sys
        import onnxruntime as ort
        from edge_sdk.bundle import open_tier
        from edge_sdk.data import TextEncoder, batches, rotten_tomatoes, stratified_split
        from edge_sdk.train import evaluate, train_steps
        ort.set_seed(0)
        opened = open_tier({str(minilm_bundle)!r}, 8, threads=2)
        encode = TextEncoder({str(minilm_bundle)!r}, opened.manifest)
        train, test = stratified_split(rotten_tomatoes(), seed=0)
        held_out = test[:300]
        before = evaluate(opened, encode, batches(held_out, 100))
        optimizer = opened.new_optimizer()
        optimizer.set_learning_rate(1e-3)
        losses = train_steps(opened, optimizer, encode, list(batches(train, 16, seed=0))[:64])
        after = evaluate(opened, encode, batches(held_out, 100))
        print(json.dumps({{"before": before.loss, "after": after.loss, "acc_before": before.accuracy,
                          "acc_after": after.accuracy, "steps": len(losses), "torch": "torch" in sys.modules}}))
    """)
    assert result["steps"] == 64 and result["torch"] is False
    assert result["after"] < result["before"] - 0.03, result
    assert result["acc_after"] > 0.6, result


def test_open_tier_errors_are_clear(minilm_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_tier(tmp_path, 8)
    with pytest.raises(BundleError, match=r"no tier r=3; its tiers are \[2, 8\]"):
        open_tier(minilm_bundle, 3)
    copy = tmp_path / "copy"
    shutil.copytree(minilm_bundle, copy)
    with open(copy / "base_weights.safetensors", "r+b") as handle:
        handle.seek(-16, 2)
        handle.write(b"\xff" * 8)
    with pytest.raises(BundleError, match="does not match the manifest's SHA-256"):
        open_tier(copy, 2)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        open_tier(copy, 2)
