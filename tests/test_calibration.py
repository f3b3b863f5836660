"""Prior calibration: devices' label counts and predicted totals, their validation, the server's bias step."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from aggregator.calibration import COUNTS, DECAY, GAIN, LIMIT, MAX_STEP, OFFSETS, TIER_PREDICTED, calibration_step
from aggregator.round_merge import merge_with_server
from aggregator.server_state import HEAD, ServerOptimizer, initial_state, tier_adapters
from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.protocol import AdapterHeader, BadStatisticsError, TrainingConfig, decode_adapter, encode_adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol import PriorStatistics, StatisticsError


def _prior(counts, predicted) -> PriorStatistics:
    return PriorStatistics(np.array(counts, dtype=np.int64), np.array(predicted, dtype=np.float64))


def test_the_bias_follows_all_tiers_and_each_offset_its_tier_s_difference_pooled_over_rounds() -> None:
    pooled: dict[str, np.ndarray] = {}
    common, offsets = calibration_step(pooled, [2, 8], [(8, 1.0, _prior([40, 60], [55.0, 45.0])),
                                                        (8, 0.5, _prior([10, 10], [10.0, 10.0]))])
    raw = GAIN * np.log(np.array([45.5, 65.5]) / np.array([60.5, 50.5]))
    np.testing.assert_allclose(common, raw - raw.mean())
    assert common[1] > 0 > common[0]
    assert np.allclose(offsets, 0.0, atol=1e-12), "one tier reporting is all tiers' common part"
    np.testing.assert_allclose(pooled[COUNTS], [45.0, 65.0])
    common, offsets = calibration_step(pooled, [2, 8], [(8, 1.0, _prior([50, 50], [50.0, 50.0])),
                                                        (2, 1.0, _prior([10, 30], [30.0, 10.0]))])
    np.testing.assert_allclose(pooled[COUNTS], DECAY * np.array([45.0, 65.0]) + [60.0, 80.0])
    np.testing.assert_allclose(pooled[TIER_PREDICTED][1], DECAY * np.array([60.0, 50.0]) + 50.0)
    assert offsets[0, 1] > 0 > offsets[1, 1], "the tier that under-predicts class 1 gets more of it than the other"
    np.testing.assert_allclose(offsets.sum(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(offsets.sum(axis=1), 0.0, atol=1e-12)
    before = offsets.copy()
    calibration_step(pooled, [2, 8], [(8, 1.0, _prior([50, 50], [50.0, 50.0]))])
    assert np.abs(pooled[OFFSETS][0] - before[0]).max() < np.abs(before[0]).max(), \
        "a tier that sent nothing keeps its sums: only the re-centring moves it"


def test_one_round_moves_no_class_by_more_than_the_cap_and_no_offset_passes_the_limit() -> None:
    pooled: dict[str, np.ndarray] = {}
    hostile = [(2, 1.0, _prior([10**6, 0, 0], [0.0, 5 * 10**5, 5 * 10**5])),
               (4, 1.0, _prior([0, 0, 10**6], [5 * 10**5, 5 * 10**5, 0.0]))]
    common, offsets = calibration_step(pooled, [2, 4], hostile)
    assert np.abs(common).max() <= MAX_STEP + 1e-12 and np.abs(offsets).max() <= MAX_STEP + 1e-12
    for _ in range(40):
        common, offsets = calibration_step(pooled, [2, 4], hostile)
    assert np.abs(offsets).max() <= LIMIT + 1e-12


@pytest.mark.parametrize("counts, predicted, message", [
    ([5, 5], [6.0, 6.0], "sum to the example count"),
    ([5, 5], [11.0, -1.0], "non-negative"),
    ([5, 5], [np.nan, 5.0], "finite"),
    ([5, 5, 0], [5.0, 5.0, 0.0], "shapes"),
    ([0, 0], [0.0, 0.0], "at least one"),
])
def test_impossible_prior_statistics_are_refused(counts, predicted, message) -> None:
    with pytest.raises(StatisticsError, match=message):
        _prior(counts, predicted).check(2)


def test_prior_statistics_travel_with_the_update_and_bad_ones_are_a_codec_error(minilm_bundle: Path,
                                                                                 trained_adapters) -> None:
    manifest = read_manifest(minilm_bundle)
    adapter = trained_adapters["r8-0"]
    header = AdapterHeader("f", 1, "dev", 8, 80)
    adapter.prior = _prior([30, 50], [35.5, 44.5])
    try:
        _, decoded = decode_adapter(encode_adapter(adapter, header), manifest)
        np.testing.assert_array_equal(decoded.prior.counts, [30, 50])
        np.testing.assert_allclose(decoded.prior.predicted, [35.5, 44.5])
        adapter.prior = _prior([30, 50], [80.0, 80.0])
        with pytest.raises(BadStatisticsError, match="sum to the example count"):
            decode_adapter(encode_adapter(adapter, header), manifest)
    finally:
        adapter.prior = None


def test_the_common_step_goes_into_the_state_bias_and_the_offsets_into_the_tiers_globals(minilm_bundle: Path,
                                                                                          trained_adapters) -> None:
    """A rank-2 device that over-predicts class 1 and a rank-8 device that under-predicts it move the state's
    bias by the common step and their tiers' globals apart by the offsets (each returns what it was sent, so
    the server optimizer's step is zero); returning the offset globals next round is no head update."""
    manifest = read_manifest(minilm_bundle)
    layers = layer_specs_from_manifest(manifest)
    start = trained_adapters["r8-0"]
    state = initial_state(start, layers, "exact")
    filler = {n: a for n, (a, _) in start.lora.items()}
    sgd = ServerOptimizer("sgd", lr=1.0, beta1=0.0)
    bias, tiers_in_order = str(manifest.output_bias), sorted(manifest.ranks)
    priors = {2: _prior([40, 40], [20.0, 60.0]), 8: _prior([40, 40], [60.0, 20.0])}

    def round_of(sent, number):
        updates = {}
        for rank, prior in priors.items():
            update = copy.copy(sent[rank])
            update.prior = prior
            updates[f"r{rank}"] = (AdapterHeader("f", number, f"r{rank}", rank, 80), update)
        return merge_with_server("svd-weighted", updates, sent, state if number == 1 else new, sgd, manifest, filler)

    sent, _ = tier_adapters(state, layers, manifest.ranks, filler)
    tiers, _, new = round_of(sent, 1)
    expected: dict[str, np.ndarray] = {}
    common, offsets = calibration_step(expected, manifest.ranks, [(r, 1.0, p) for r, p in priors.items()])
    np.testing.assert_allclose(new.params[HEAD + bias] - state.params[HEAD + bias], common, atol=1e-6)
    for row, rank in enumerate(tiers_in_order):
        np.testing.assert_allclose(tiers[rank].head[bias] - new.params[HEAD + bias], offsets[row], atol=1e-6)
    assert tiers[2].head[bias][1] < tiers[8].head[bias][1], "the over-predicting tier gets less of class 1"
    assert {COUNTS, OFFSETS} <= set(new.moments)
    after_first = new
    again, _, new = round_of(tiers, 2)
    common, offsets = calibration_step(expected, manifest.ranks, [(r, 1.0, p) for r, p in priors.items()])
    assert np.allclose(new.params[HEAD + bias] - after_first.params[HEAD + bias], common, atol=1e-6), \
        "returning its tier's global with the offset in it is no head update"
    np.testing.assert_allclose(again[8].head[bias] - new.params[HEAD + bias], offsets[tiers_in_order.index(8)],
                               atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"server_optimizer": None}, "a server optimizer"),
    ({"training": TrainingConfig(prior_calibration=True, feature_statistics=True)}, "no closed-form head"),
    ({"head": "local"}, "the head shared"),
])
def test_the_aggregator_refuses_calibration_it_cannot_run(minilm_bundle: Path, tmp_path: Path, options, message) -> None:
    from aggregator.service import Aggregator, AggregatorOptions
    from edge_sdk.protocol.transport import BrokerSettings

    settings = {"training": TrainingConfig(prior_calibration=True), "server_optimizer": ServerOptimizer("adam"), **options}
    with pytest.raises(ValueError, match=message):
        Aggregator(minilm_bundle, BrokerSettings(), AggregatorOptions(federation="f", rounds=1, state_dir=tmp_path,
                                                                      **settings))
