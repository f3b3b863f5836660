"""The closed-form head: feature statistics on the device, their validation, and the server's LDA solve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.closed_form import bounded_statistics, closed_form_head
from aggregator.round_merge import SAMPLE_CAP, merge_with_server
from aggregator.server_state import HEAD, ServerOptimizer, ServerState, initial_state, tier_adapters
from edge_sdk.protocol import (
    Adapter, AdapterHeader, BadStatisticsError, FeatureStatistics, StatisticsError, TrainingConfig, decode_adapter,
    encode_adapter,
)
from edge_sdk.protocol.manifest import read_manifest
from tests.test_server_state import LAYERS, RANKS, _Manifest, _start

CLASSES, WIDTH = 3, 8


def _gaussian_classes(rng: np.random.Generator, per_class: int, classes: int = CLASSES,
                      width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with one shared, correlated covariance."""
    means = rng.standard_normal((classes, width)) * 1.5
    mix = rng.standard_normal((width, width)) * 0.5 + np.eye(width)
    labels = np.repeat(np.arange(classes), per_class)
    return means[labels] + rng.standard_normal((labels.size, width)) @ mix, labels


def _statistics(features: np.ndarray, labels: np.ndarray, classes: int = CLASSES) -> FeatureStatistics:
    stats = FeatureStatistics.zeros(classes, features.shape[1])
    stats.add(features, labels)
    return stats


def test_one_class_devices_pooled_give_the_central_lda_head() -> None:
    """Ten devices holding one class each (the extreme of label skew) sum to the central statistics, and
    the head solved from them is the textbook LDA of all examples, computed here from the raw features."""
    rng = np.random.default_rng(0)
    features, labels = _gaussian_classes(rng, 400)
    devices = [np.flatnonzero(labels == c)[part::4] for c in range(CLASSES) for part in range(4)][:10]
    pooled = sum((_statistics(features[i], labels[i]) for i in devices[1:]), _statistics(*(x[devices[0]]
                                                                                      for x in (features, labels))))
    held = np.concatenate(devices)
    x, y = features[held], labels[held]
    weight, bias = closed_form_head(pooled, shrinkage=0.0)
    means = np.stack([x[y == c].mean(axis=0) for c in range(CLASSES)])
    covariance = sum(np.cov(x[y == c].T, bias=True) * np.sum(y == c) for c in range(CLASSES)) / (len(y) - CLASSES)
    expected = np.linalg.solve(covariance, means.T).T
    np.testing.assert_allclose(weight, expected - expected.mean(axis=0), rtol=1e-4, atol=1e-4)
    prior = (np.bincount(y, minlength=CLASSES) + 1.0) / (len(y) + CLASSES)
    offset = -0.5 * np.sum(expected * means, axis=1) + np.log(prior)
    np.testing.assert_allclose(bias, offset - offset.mean(), rtol=1e-4, atol=1e-4)
    test_x, test_y = _gaussian_classes(np.random.default_rng(0), 200)
    assert np.mean(np.argmax(test_x @ weight.T + bias, axis=1) == test_y) > 0.9


@pytest.mark.parametrize("tamper, reason", [
    (lambda s: s.gram.__setitem__((0, 1), s.gram[0, 1] + 5.0), "not symmetric"),
    (lambda s: s.gram.__setitem__((0, 0), -s.gram[0, 0]), "positive semi-definite"),
    (lambda s: s.sums.__setitem__(0, s.sums[0] * 100), "larger than its count"),
    (lambda s: s.counts.__setitem__(0, -1), "non-negative"),
    (lambda s: s.sums.__setitem__((1, 2), np.nan), "NaN"),
])
def test_statistics_no_features_could_produce_are_refused(tamper, reason: str) -> None:
    rng = np.random.default_rng(1)
    stats = _statistics(*_gaussian_classes(rng, 20))
    stats.check(CLASSES, WIDTH)
    tamper(stats)
    with pytest.raises(StatisticsError, match=reason):
        stats.check(CLASSES, WIDTH)
    with pytest.raises(StatisticsError, match="shapes"):
        _statistics(*_gaussian_classes(rng, 20)).check(CLASSES, WIDTH + 1)


def test_a_device_reporting_inflated_features_or_counts_is_bounded_by_the_cap() -> None:
    rng = np.random.default_rng(2)
    honest = [_statistics(*_gaussian_classes(rng, 10)) for _ in range(4)]
    loud = _statistics(*_gaussian_classes(rng, 10)).scaled(1000.0)
    many = _statistics(*_gaussian_classes(rng, 10)).weighed(10**6)
    bounded = bounded_statistics([*honest, loud], cap=4.0)
    power = [np.trace(s.gram) / s.samples for s in bounded]
    assert all(b is s for b, s in zip(bounded[:4], honest)), "honest devices are untouched"
    assert power[4] == pytest.approx(4.0 * sorted(power[:4])[2], rel=1e-9), "cap × the median of all five"
    weighed = bounded_statistics([*honest, many], cap=4.0)[4]
    assert weighed.samples == 4 * 30
    np.testing.assert_allclose(weighed.gram / weighed.samples, many.gram / many.samples, rtol=1e-9)


def _exact_server(rng: np.random.Generator):
    """(manifest with head names w and b, filler, exact start state, its tier adapters, adafactor)."""
    manifest = _Manifest()
    manifest.output_weight, manifest.output_bias = "w", "b"
    start = _start(rng)
    filler = {n: a for n, (a, _) in start.lora.items()}
    state = initial_state(start, LAYERS, "exact")
    sent, _ = tier_adapters(state, LAYERS, RANKS, filler)
    return manifest, filler, state, sent, ServerOptimizer("adafactor", lr=1e-3)


def test_the_server_replaces_the_averaged_head_by_the_solved_one_and_keeps_decayed_statistics() -> None:
    manifest, filler, state, sent, optimizer = _exact_server(np.random.default_rng(3))
    rounds = []
    for _ in range(2):
        updates = {}
        for i in range(3):
            stats = _statistics(*_gaussian_classes(np.random.default_rng(i), 8, classes=2, width=12), classes=2)
            trained = Adapter(2, sent[2].lora, {k: v + 7.0 for k, v in sent[2].head.items()}, stats)
            updates[f"c{i}"] = (AdapterHeader("f", 1, f"c{i}", 2, 16), trained)
        tiers, _, state = merge_with_server("svd-weighted", updates, sent, state, optimizer, manifest, filler)
        state = ServerState.from_bytes(state.to_bytes(), "exact")
        rounds.append((updates, tiers, state))
    (_, _, after_one), (second, tiers, after_two) = rounds
    expected = FeatureStatistics(*(after_one.moments[k].astype(np.float64) * 0.9
                                   for k in ("stats::gram", "stats::sums", "stats::counts")))
    for stats in bounded_statistics([adapter.statistics for _, adapter in second.values()], SAMPLE_CAP):
        expected = expected + FeatureStatistics(stats.gram, stats.sums, stats.counts.astype(np.float64))
    np.testing.assert_allclose(after_two.moments["stats::counts"], expected.counts, rtol=1e-6)
    weight, bias = closed_form_head(expected)
    np.testing.assert_allclose(after_two.params[HEAD + "w"], weight, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(tiers[4].head["b"], bias, rtol=1e-3, atol=1e-4)
    assert not np.allclose(tiers[4].head["w"], 7.0), "the clients' averaged head is not used"


def test_after_the_statistics_rounds_the_solved_head_stays_and_client_heads_are_ignored() -> None:
    """`TrainingConfig.statistics_rounds`: devices stop sending statistics, the server keeps its last head."""
    rng = np.random.default_rng(4)
    manifest, filler, state, sent, optimizer = _exact_server(rng)
    stats = _statistics(*_gaussian_classes(rng, 8, classes=2, width=12), classes=2)
    first = {"c0": (AdapterHeader("f", 1, "c0", 2, 16), Adapter(2, sent[2].lora, sent[2].head, stats))}
    solved, _, state = merge_with_server("svd-weighted", first, sent, state, optimizer, manifest, filler,
                                         closed_form=True)
    moved = {k: (a, b + 0.01) for k, (a, b) in solved[2].lora.items()}
    second = {"c0": (AdapterHeader("f", 2, "c0", 2, 16), Adapter(2, moved, {k: v + 7.0 for k, v in solved[2].head.items()}))}
    tiers, _, after = merge_with_server("svd-weighted", second, solved, state, optimizer, manifest, filler,
                                        closed_form=True)
    for name in ("w", "b"):
        np.testing.assert_array_equal(tiers[4].head[name], solved[4].head[name])
    assert any(not np.array_equal(tiers[4].lora[k][1], solved[4].lora[k][1]) for k in LAYERS), "the adapter still moves"
    np.testing.assert_array_equal(after.moments["stats::counts"], state.moments["stats::counts"])
    averaged, _, _ = merge_with_server("svd-weighted", second, solved, state, optimizer, manifest, filler)
    assert not np.array_equal(averaged[4].head["w"], solved[4].head["w"]), "without closed_form the head is averaged"
    config = TrainingConfig(feature_statistics=True, statistics_rounds=3)
    assert [config.sends_statistics(r) for r in (1, 3, 4)] == [True, True, False]
    assert TrainingConfig(feature_statistics=True).sends_statistics(10**6)
    assert not TrainingConfig(statistics_rounds=3).sends_statistics(1)


def test_trained_features_feed_the_head_and_their_statistics_cross_the_codec(minilm_bundle: Path) -> None:
    """On the real bundle: logits = features · Wᵀ + b (eval graph); the statistics of a device's examples
    are the sums of those features, survive encoding, and a tampered Gram matrix is refused on decoding."""
    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.trainer import Trainer

    manifest = read_manifest(minilm_bundle)
    assert manifest.feature_width == 384
    trainer = Trainer(minilm_bundle, min(manifest.ranks), threads=2)
    examples = rotten_tomatoes()[:40]
    trainer.fit(examples, steps=2, batch_size=8, lr=1e-2)
    trainer.opened.module.eval()
    labels = np.array([e.label for e in examples])
    feeds = trainer.encoder(examples)
    _, logits, features = trainer.opened.run(trainer._inputs(feeds), labels, with_features=True)
    values = trainer.state()
    np.testing.assert_allclose(features @ values[manifest.output_weight].T + values[manifest.output_bias], logits,
                               atol=1e-4)
    stats = trainer.feature_statistics(examples)
    np.testing.assert_array_equal(stats.counts, np.bincount(labels, minlength=2))
    np.testing.assert_allclose(stats.sums[1], features[labels == 1].sum(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.gram, features.T.astype(np.float64) @ features, rtol=1e-4, atol=1e-3)
    stats.check(len(manifest.labels), 384)
    adapter = trainer.get_adapter()
    adapter.statistics = stats
    header = AdapterHeader("f", 1, "c0", adapter.rank, len(examples))
    _, decoded = decode_adapter(encode_adapter(adapter, header), manifest)
    np.testing.assert_allclose(decoded.statistics.gram, stats.gram, rtol=1e-6)
    np.testing.assert_array_equal(decoded.statistics.counts, stats.counts)
    stats.gram[3, 3] = -stats.gram[3, 3] - 1.0
    with pytest.raises(BadStatisticsError, match="semi-definite"):
        decode_adapter(encode_adapter(adapter, header), manifest)
