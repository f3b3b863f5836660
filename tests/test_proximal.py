"""`fedpeft-export --proximal`: FedProx's (μ/2)·‖θ − θ_anchor‖² inside the on-device training graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import open_tier
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.encoders import encoder_for
from edge_sdk.ort_training import ort
from edge_sdk.protocol import TrainingConfig
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol.transport import BrokerSettings
from edge_sdk.trainer import Trainer

MU = 0.7


@pytest.fixture(scope="module")
def proximal_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "proximal"
    export_bundle(out, ExportOptions(ranks=(2,), proximal=True))
    return out


def _batch(bundle: Path):
    examples = rotten_tomatoes()[:16]
    feeds = encoder_for(bundle, read_manifest(bundle))(examples)
    return [feeds["input_ids"], feeds["attention_mask"]], np.array([e.label for e in examples], dtype=np.int64)


def test_the_term_adds_half_mu_times_the_squared_distance_and_its_gradient(proximal_bundle: Path) -> None:
    manifest = read_manifest(proximal_bundle)
    assert manifest.lora.proximal
    tier = manifest.tier(2)
    opened = open_tier(proximal_bundle, 2, threads=2)
    params = opened.state.parameters
    rng = np.random.default_rng(0)
    theta = {name: params[name].data.copy() for name in tier.trainable}
    anchors = {name: (value + rng.normal(0, 0.05, value.shape)).astype(np.float32) for name, value in theta.items()}
    distance = sum(float(np.sum((theta[n].astype(np.float64) - anchors[n]) ** 2)) for n in tier.trainable)
    inputs, labels = _batch(proximal_bundle)

    opened.module.eval()
    plain, _ = opened.run(inputs, labels)
    proximal, _ = opened.run(inputs, labels, MU, anchors)
    assert float(proximal) - float(plain) == pytest.approx(MU / 2 * distance, rel=1e-4)

    opened.module.train()
    grads = []
    for mu in (0.0, MU):
        ort.set_seed(3)
        opened.run(inputs, labels, mu, anchors)
        grads.append({name: params[name].grad.copy() for name in tier.trainable})
        opened.module.lazy_reset_grad()
    for name in tier.trainable:
        np.testing.assert_allclose(grads[1][name] - grads[0][name], MU * (theta[name] - anchors[name]),
                                   rtol=1e-4, atol=1e-6)


def test_fit_anchors_at_its_start_and_refuses_mu_without_the_graph(proximal_bundle: Path, minilm_bundle: Path) -> None:
    data = rotten_tomatoes()[:48]
    with pytest.raises(ValueError, match="--proximal"):
        Trainer(minilm_bundle, 2, threads=2).fit(data, steps=1, proximal_mu=0.1)
    moved = {}
    for mu in (0.0, 1e4):
        trainer = Trainer(proximal_bundle, 2, threads=2)
        start = trainer.state()
        trainer.fit(data, steps=3, lr=1e-2, proximal_mu=mu, seed=0)
        moved[mu] = sum(float(np.linalg.norm(trainer.state()[n] - start[n])) for n in trainer.opened.tier.trainable)
    assert 0 < moved[1e4] < moved[0.0]


def test_the_aggregator_refuses_mu_for_a_bundle_without_the_term(minilm_bundle: Path, tmp_path: Path) -> None:
    from aggregator.service import Aggregator, AggregatorOptions

    options = AggregatorOptions(federation="f", rounds=1, state_dir=tmp_path, training=TrainingConfig(proximal_mu=0.01))
    with pytest.raises(ValueError, match="fedpeft-export --proximal"):
        Aggregator(minilm_bundle, BrokerSettings(), options)
