"""The portable training path: standard-operator gradient graphs, numpy optimizers, plain onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer
from tests.conftest import ROOT

STANDARD_DOMAINS = ("", "ai.onnx")


def test_every_tier_has_a_standard_operator_graph_whose_gradients_match_the_training_build(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    for tier in manifest.tiers:
        graph = onnx.load(str(minilm_bundle / tier.dir / tier.portable_model))
        assert {node.domain for node in graph.graph.node} <= set(STANDARD_DOMAINS), tier.rank
        assert [o.name for o in graph.graph.output][-len(tier.trainable):] == [n + "_grad" for n in tier.trainable]
        assert tier.portable_max_rel_diff is not None and tier.portable_max_rel_diff <= 1e-5, tier.portable_max_rel_diff


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fifty_steps_give_the_same_losses_on_either_path(minilm_bundle: Path, sgd_bundle: Path, optimizer: str) -> None:
    """Same start, batches and dropout seed: the portable graph + numpy optimizer follow onnxruntime-training's
    losses step for step (dropout included: both draw from onnxruntime's seeded generator in the same order)."""
    bundle, lr = (minilm_bundle, 2e-3) if optimizer == "adamw" else (sgd_bundle, 0.05)
    examples = rotten_tomatoes()[:400]
    losses = {}
    for backend in ("ort-training", "portable"):
        trainer = Trainer(bundle, 2, threads=2, backend=backend)
        assert trainer.backend == backend
        losses[backend] = np.array(trainer.fit(examples, steps=50, batch_size=8, lr=lr, seed=4).losses)
    assert losses["portable"][-1] < losses["portable"][:5].mean()
    np.testing.assert_allclose(losses["portable"], losses["ort-training"], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def device_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `scripts/device-install.sh` puts on a device on the portable path (plain onnxruntime, no torch)."""
    target = tmp_path_factory.mktemp("device-site")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device-install.sh"), str(target)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    return target


@pytest.mark.slow
def test_plain_onnxruntime_trains_a_tier_with_torch_and_the_training_build_out_of_reach(
        minilm_bundle: Path, device_site: Path, tmp_path: Path) -> None:
    """A fresh interpreter that sees only the device install and this repository (no site-packages, so no
    onnxruntime-training, torch, transformers, onnx or sympy): the tier trains and its held-out loss falls."""
    examples = rotten_tomatoes()[:600]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": e.x, "label": e.label}) + "\n" for e in examples))
    code = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class NotOnDevice(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft", "onnx", "sympy"):
                    raise ImportError(name + " is not on this device")
        sys.meta_path.insert(0, NotOnDevice())
        import onnxruntime
        from edge_sdk.datasets import read_jsonl
        from edge_sdk.runtime import training_build_installed
        from edge_sdk.trainer import Trainer
        examples = read_jsonl({str(data)!r})
        trainer = Trainer({str(minilm_bundle)!r}, 2, threads=2)
        before = trainer.evaluate(examples[400:]).loss
        trainer.fit(examples[:400], steps=30, batch_size=16, lr=5e-3, seed=0)
        print(json.dumps({{"backend": trainer.backend, "before": before, "after": trainer.evaluate(examples[400:]).loss,
                          "training_build": training_build_installed(), "onnxruntime": onnxruntime.__file__}}))
    """)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{device_site}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "portable" and not result["training_build"]
    assert result["onnxruntime"].startswith(str(device_site))
    assert result["after"] < result["before"] - 0.05, result
