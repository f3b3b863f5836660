"""Shared fixtures: one real MiniLM bundle per session and a torch-free subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_RANKS = (2, 8)

# Makes torch, transformers and peft unimportable, as on a device that ships without them.
_NO_TORCH_PREAMBLE = """
import importlib.abc, sys
class _DeviceHasNoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(f"{name} is not installed on this device")
        return None
sys.meta_path.insert(0, _DeviceHasNoTorch())
"""


def run_without_torch(code: str, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter where torch cannot be imported; it prints one JSON line last."""
    script = _NO_TORCH_PREAMBLE + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert result.returncode == 0, f"device process failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory: pytest.TempPathFactory):
    """One tier-probe cache for the session, as a device keeps one: each tier is measured once per batch shape."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("probe-cache")
    patch.setenv("FEDPEFT_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model exported at two tiers with Rotten Tomatoes' class names (the full four-tier export is
    in the demo/benchmarks)."""
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "minilm"
    export_bundle(out, ExportOptions(ranks=TEST_RANKS, labels=("rotten", "fresh")))
    return out


@pytest.fixture(scope="session")
def sgd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model at one tier with the plain SGD optimizer graph."""
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "sgd"
    export_bundle(out, ExportOptions(ranks=(2,), optimizer="sgd"))
    return out


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real mosquitto broker on a free loopback port, stopped after the test."""
    from aggregator.broker import Mosquitto

    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def trained_adapters(minilm_bundle: Path) -> dict[str, object]:
    """Real adapters (a few steps on Rotten Tomatoes) at each test tier: name → Adapter."""
    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.trainer import Trainer

    examples = rotten_tomatoes()[:400]
    adapters = {}
    for rank in TEST_RANKS:
        trainer = Trainer(minilm_bundle, rank, threads=2)
        for seed in (0, 1):
            trainer.fit(examples, steps=2, batch_size=8, lr=1e-2, seed=seed)
            adapters[f"r{rank}-{seed}"] = trainer.get_adapter()
    return adapters


@pytest.fixture(autouse=True)
def reap_processes():
    """Kill aggregator/client processes a failed test left running."""
    yield
    from tests.federation import RUNNING

    for process in RUNNING:
        if process.poll() is None:
            process.kill()
            process.wait()
    RUNNING.clear()


def peft_logits(folder: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the original MiniLM-L6 with the peft adapter folder loaded by `PeftModel.from_pretrained`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from export.model import resolve_model_dir

    base = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_dir(None)), num_labels=2,
                                                              attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
