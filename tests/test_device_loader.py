"""The device side opens and trains a bundle with onnxruntime + numpy alone (torch unimportable)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk.bundle import open_tier
from edge_sdk.protocol.manifest import BundleError
from tests.conftest import ROOT, run_without_torch


def test_open_tier_without_torch_matches_inference_graph(minilm_bundle: Path) -> None:
    result = run_without_torch(f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        from edge_sdk.bundle import open_tier
        from edge_sdk.datasets import rotten_tomatoes
        from edge_sdk.encoders import TextEncoder
        opened = open_tier({str(minilm_bundle)!r}, 8)
        feeds = TextEncoder({str(minilm_bundle)!r}, opened.manifest)(rotten_tomatoes()[:6])
        opened.module.eval()
        _, logits = opened.run([feeds["input_ids"], feeds["attention_mask"]], np.zeros(6, dtype=np.int64))
        tier = opened.manifest.tier(8)
        session = ort.InferenceSession({str(minilm_bundle)!r} + "/" + tier.dir + "/" + tier.inference_model)
        (reference,) = session.run(["logits"], feeds)
        print(json.dumps({{"diff": float(np.abs(logits - reference).max()),
                          "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
    """)
    assert result == {"diff": pytest.approx(0.0, abs=1e-5), "torch": False, "transformers": False}


def test_trainer_without_torch_lowers_held_out_loss(minilm_bundle: Path) -> None:
    result = run_without_torch(f"""
        import json, sys
        from edge_sdk.data import stratified_split
        from edge_sdk.datasets import rotten_tomatoes
        from edge_sdk.trainer import Trainer
        trainer = Trainer({str(minilm_bundle)!r}, 8, threads=2)
        train, test = stratified_split(rotten_tomatoes(), seed=0)
        before = trainer.evaluate(test[:300])
        report = trainer.fit(train[:1536], epochs=1, batch_size=16, lr=2e-3, schedule="cosine", warmup_steps=5)
        after = trainer.evaluate(test[:300])
        print(json.dumps({{"before": before.loss, "after": after.loss, "acc_after": after.accuracy,
                          "f1_after": after.macro_f1, "steps": report.steps, "samples": report.samples,
                          "peak": report.peak_rss_bytes, "torch": "torch" in sys.modules}}))
    """)
    assert result["steps"] == 96 and result["samples"] == 1536 and result["torch"] is False
    assert result["after"] < result["before"] - 0.03, result
    assert result["acc_after"] > 0.6 and result["f1_after"] > 0.5, result
    assert 100 * 2**20 < result["peak"] < 2**30, result


def test_sdk_imports_no_torch_even_where_torch_is_installed() -> None:
    code = (
        "import sys, json; import edge_sdk.trainer, edge_sdk.profile, edge_sdk.rank, edge_sdk.protocol, "
        "edge_sdk.peft_format; import onnxruntime; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert importlib.util.find_spec("torch") is not None, "this check needs torch installed beside the SDK"


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
