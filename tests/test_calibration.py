"""Prior calibration: devices' label counts and predicted totals, their validation, the server's bias step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.calibration import COUNTS, DECAY, GAIN, LIMIT, MAX_STEP, OFFSETS, PREDICTED, calibration_step
from aggregator.round_merge import merge_with_server
from aggregator.server_state import HEAD, ServerOptimizer, initial_state, tier_adapters
from aggregator.strategies.base import layer_specs_from_manifest
from edge_sdk.protocol import AdapterHeader, BadStatisticsError, TrainingConfig, decode_adapter, encode_adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol import PriorStatistics, StatisticsError


def _prior(counts, predicted) -> PriorStatistics:
    return PriorStatistics(np.array(counts, dtype=np.int64), np.array(predicted, dtype=np.float64))


def test_the_step_moves_the_offset_toward_the_class_the_tier_under_predicts_and_pools_rounds() -> None:
    pooled: dict[str, np.ndarray] = {}
    offsets = calibration_step(pooled, [2, 8], [(8, 1.0, _prior([40, 60], [55.0, 45.0])),
                                                (8, 0.5, _prior([10, 10], [10.0, 10.0]))])
    raw = GAIN * np.log(np.array([45.5, 65.5]) / np.array([60.5, 50.5]))
    np.testing.assert_allclose(offsets[1], raw - raw.mean())
    assert offsets[1, 1] > 0 > offsets[1, 0]
    assert np.array_equal(offsets[0], [0.0, 0.0]), "a tier that sent nothing keeps its offset"
    np.testing.assert_allclose(pooled[COUNTS][1], [45.0, 65.0])
    first = offsets[1].copy()
    again = calibration_step(pooled, [2, 8], [(8, 1.0, _prior([50, 50], [50.0, 50.0])),
                                              (2, 1.0, _prior([10, 30], [30.0, 10.0]))])
    np.testing.assert_allclose(pooled[COUNTS][1], DECAY * np.array([45.0, 65.0]) + 50.0)
    np.testing.assert_allclose(pooled[PREDICTED][1], DECAY * np.array([60.0, 50.0]) + 50.0)
    assert 0 < again[1, 1] - first[1] < first[1], "a calibrated round shrinks the pooled gap"
    assert again[0, 1] > 0 > again[0, 0], "each tier follows its own predictions"
    calibration_step(pooled, [2, 8], [(8, 1.0, _prior([50, 50], [50.0, 50.0]))])
    assert np.array_equal(pooled[OFFSETS][0], again[0]), "a stale gap is not applied twice"


def test_one_round_moves_no_class_by_more_than_the_cap_and_no_offset_passes_the_limit() -> None:
    pooled: dict[str, np.ndarray] = {}
    hostile = [(4, 1.0, _prior([10**6, 0, 0], [0.0, 5 * 10**5, 5 * 10**5]))]
    offsets = calibration_step(pooled, [4], hostile)
    assert np.abs(offsets).max() <= MAX_STEP + 1e-12
    for _ in range(40):
        offsets = calibration_step(pooled, [4], hostile)
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


def test_the_offset_goes_into_its_tiers_global_and_not_into_the_state_bias(minilm_bundle: Path,
                                                                              trained_adapters) -> None:
    """A rank-8 device whose predictions lean to class 0 while its labels lean to class 1 moves the rank-8
    global's bias by exactly the calibration step and leaves the other tiers' and the state's bias alone (it
    returns what it was sent, so the server optimizer's step is zero); returning the offset global next round
    is no head update."""
    manifest = read_manifest(minilm_bundle)
    layers = layer_specs_from_manifest(manifest)
    start = trained_adapters["r8-0"]
    state = initial_state(start, layers, "exact")
    filler = {n: a for n, (a, _) in start.lora.items()}
    sgd = ServerOptimizer("sgd", lr=1.0, beta1=0.0)
    bias = str(manifest.output_bias)
    sent, _ = tier_adapters(state, layers, manifest.ranks, filler)
    update = sent[8]
    update.prior = _prior([20, 60], [50.0, 30.0])
    tiers, _, new = merge_with_server("svd-weighted", {"dev": (AdapterHeader("f", 1, "dev", 8, 80), update)}, sent,
                                      state, sgd, manifest, filler)
    expected = calibration_step({}, manifest.ranks, [(8, 1.0, _prior([20, 60], [50.0, 30.0]))])
    row = sorted(manifest.ranks).index(8)
    np.testing.assert_allclose(new.params[HEAD + bias], state.params[HEAD + bias], atol=1e-6)
    np.testing.assert_allclose(tiers[8].head[bias] - new.params[HEAD + bias], expected[row], atol=1e-6)
    np.testing.assert_allclose(tiers[2].head[bias], new.params[HEAD + bias], atol=1e-6)
    assert {COUNTS, PREDICTED, OFFSETS} <= set(new.moments)
    returned = tiers[8]
    returned.prior = _prior([40, 40], [40.0, 40.0])
    again, _, after = merge_with_server("svd-weighted", {"dev": (AdapterHeader("f", 2, "dev", 8, 80), returned)},
                                        tiers, new, sgd, manifest, filler)
    np.testing.assert_allclose(after.params[HEAD + bias], state.params[HEAD + bias], atol=1e-6)
    np.testing.assert_allclose(again[8].head[bias] - after.params[HEAD + bias], after.moments[OFFSETS][row], atol=1e-6)


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
