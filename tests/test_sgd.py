"""`fedpeft-export --optimizer sgd`: devices take plain gradient steps instead of AdamW's normalized ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_sdk.bundle import open_tier
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.encoders import encoder_for
from edge_sdk.protocol.manifest import read_manifest

LR = 0.05


def test_sgd_bundle_steps_by_the_learning_rate_times_the_gradient(sgd_bundle: Path, minilm_bundle: Path) -> None:
    manifest = read_manifest(sgd_bundle)
    assert manifest.lora.optimizer == "sgd" and read_manifest(minilm_bundle).lora.optimizer == "adamw"
    tier = manifest.tier(2)
    ops = {node.op_type for node in onnx.load(str(sgd_bundle / tier.dir / tier.optimizer_model)).graph.node}
    assert any("SGD" in op for op in ops) and not any("AdamW" in op for op in ops)

    opened = open_tier(sgd_bundle, 2, threads=2)
    optimizer = opened.new_optimizer()
    optimizer.set_learning_rate(LR)
    examples = rotten_tomatoes()[:16]
    feeds = encoder_for(sgd_bundle, manifest)(examples)
    opened.module.train()
    opened.run([feeds["input_ids"], feeds["attention_mask"]], np.array([e.label for e in examples], dtype=np.int64))
    params = opened.state.parameters
    before = {name: params[name].data.copy() for name in tier.trainable}
    grads = {name: params[name].grad.copy() for name in tier.trainable}
    optimizer.step()
    assert any(np.abs(g).max() > 0 for g in grads.values())
    for name in tier.trainable:
        np.testing.assert_allclose(params[name].data, before[name] - LR * grads[name], rtol=1e-6, atol=1e-7)
    frozen = sorted(set(tier.parameter_order) - set(tier.trainable))
    assert frozen and all(params[name].grad is None for name in frozen[:3])


def test_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    from export.bundle import ExportError, ExportOptions, export_bundle

    with pytest.raises(ExportError, match="choose one of adamw, sgd"):
        export_bundle(tmp_path / "b", ExportOptions(ranks=(2,), optimizer="lion"))
    assert not (tmp_path / "b").exists()


def test_an_sgd_tier_serves_devices_in_turn_without_reopening_and_trains_as_a_fresh_one(sgd_bundle: Path) -> None:
    from edge_sdk.trainer import Trainer

    sentences = rotten_tomatoes()[:64]
    shared = Trainer(sgd_bundle, 2, threads=1)
    opened = shared.opened
    shared.fit(sentences[:32], steps=3, batch_size=8, lr=LR, seed=1)
    first_device = shared.state()
    shared.load_state(None)
    assert shared.opened is opened, "SGD keeps no optimizer state: the session stays open"
    shared.fit(sentences[32:], steps=3, batch_size=8, lr=LR, seed=2)
    fresh = Trainer(sgd_bundle, 2, threads=1)
    fresh.fit(sentences[32:], steps=3, batch_size=8, lr=LR, seed=2)
    for name, value in fresh.state().items():
        np.testing.assert_array_equal(shared.state()[name], value)
    shared.load_state(first_device)
    for name, value in first_device.items():
        np.testing.assert_array_equal(shared.state()[name], value)


def test_logit_adjustment_trains_on_logits_shifted_by_the_local_label_prior(sgd_bundle: Path) -> None:
    from edge_sdk.trainer import Trainer

    negatives = [e for e in rotten_tomatoes() if e.label == 0][:32]
    trainer = Trainer(sgd_bundle, 2, threads=1)
    bias = trainer.manifest.output_bias
    assert bias is not None and bias.endswith("bias")
    start = trainer.state()
    moved = {}
    for tau in (0.0, 1.0):
        trainer.load_state(start)
        trainer.fit(negatives, steps=4, batch_size=8, lr=0.5, seed=3, logit_adjustment=tau)
        moved[tau] = trainer.state()[bias] - start[bias]
    # Plain cross-entropy on one class drives the bias toward it; the adjusted loss already expects that
    # class (π = 33/34 after smoothing), so its bias barely moves, and the τ·log π shift is undone after.
    margin = {tau: float(d[0] - d[1]) for tau, d in moved.items()}
    assert margin[0.0] > 0.5, margin
    assert abs(margin[1.0]) < 0.2 * margin[0.0], margin
    assert np.abs(moved[1.0]).max() < 0.3, moved[1.0]
    with pytest.raises(ValueError, match="finite τ ≥ 0"):
        trainer.fit(negatives, steps=1, logit_adjustment=-1.0)


def test_the_aggregator_refuses_a_negative_or_non_finite_logit_adjustment(sgd_bundle: Path, tmp_path: Path) -> None:
    from aggregator.service import Aggregator, AggregatorOptions
    from edge_sdk.protocol import TrainingConfig
    from edge_sdk.protocol.transport import BrokerSettings

    for tau in (-0.5, float("nan"), float("inf")):
        options = AggregatorOptions(federation="f", rounds=1, state_dir=tmp_path / "s",
                                    training=TrainingConfig(logit_adjustment=tau))
        with pytest.raises(ValueError, match="finite τ ≥ 0"):
            Aggregator(sgd_bundle, BrokerSettings(), options)
