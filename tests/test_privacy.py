"""dp-fedavg: joint clipping of adapter and head, the noise it adds, its accountant, and the server path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.privacy import KEY, LEDGER, DpSettings, Sampling, epsilon, new_key, noise_generator
from aggregator.round_merge import merge_with_server
from aggregator.server_state import HEAD, ServerOptimizer, ServerState, tier_adapters
from aggregator.service import AggregatorOptions, check_privacy_options
from aggregator.strategies import ClientUpdate, LayerSpec, get_strategy
from edge_sdk.protocol import Adapter, AdapterHeader, TrainingConfig
from tests.test_server_state import _Manifest

LAYERS = {"l0": LayerSpec("l0", 30, 40, 16.0), "l1": LayerSpec("l1", 30, 40, 16.0)}
RANKS = [2, 4]
DP = get_strategy("dp-fedavg")


def _update(cid: str, rng: np.random.Generator, scale: float = 1.0) -> ClientUpdate:
    factors = {n: (rng.standard_normal((4, 30)), scale * rng.standard_normal((40, 4)) / 100) for n in LAYERS}
    sent = {n: (rng.standard_normal((4, 30)), np.zeros((40, 4))) for n in LAYERS}
    return ClientUpdate(cid, 4, 10, factors, sent)


def _delta(u: ClientUpdate, name: str) -> np.ndarray:
    (a, b), (a0, b0) = u.factors[name], u.sent[name]
    return LAYERS[name].scaling(4) * (b @ a - b0 @ a0)


def test_each_whole_update_is_clipped_jointly_with_its_head_and_divided_by_the_sampled_count() -> None:
    rng = np.random.default_rng(0)
    updates = [_update("a", rng), _update("b", rng, scale=1000.0), _update("c", rng)]
    heads = {"a": {"w": np.full(5, 0.01)}, "b": {"w": np.full(5, 0.01)}, "c": {"w": np.full(5, 100.0)}}
    result = DP(updates, LAYERS, RANKS, clip=10.0, noise_multiplier=0.0, sampled=5, rng=rng, head_updates=heads)
    norms = [math.sqrt(sum(np.sum(_delta(u, n) ** 2) for n in LAYERS) + np.sum(heads[u.client_id]["w"] ** 2))
             for u in updates]
    factors = [min(1.0, 10.0 / x) for x in norms]
    assert factors[0] == 1.0 and factors[1] < 1e-2 and factors[2] < 0.1
    for name in LAYERS:
        expected = sum(f * _delta(u, name) for f, u in zip(factors, updates)) / 5
        np.testing.assert_allclose(result.global_state[name].dense(), expected, atol=1e-12)
        assert result.weights[name] == pytest.approx({u.client_id: f / 5 for u, f in zip(updates, factors)})
    np.testing.assert_allclose(result.head["w"], sum(f * heads[c]["w"] for f, c in zip(factors, "abc")) / 5)
    assert factors[1] * math.sqrt(sum(np.sum(_delta(updates[1], n) ** 2) for n in LAYERS)) <= 10.0 + 1e-9


def test_the_noise_has_std_z_times_clip_over_the_sampled_count_and_follows_the_key() -> None:
    layers = {"big": LayerSpec("big", 300, 300, 16.0)}
    zero = ClientUpdate("a", 2, 10, {"big": (np.zeros((2, 300)), np.zeros((300, 2)))},
                        {"big": (np.zeros((2, 300)), np.zeros((300, 2)))})
    key = new_key()
    first = DP([zero], layers, [2], clip=2.0, noise_multiplier=0.5, sampled=4, rng=noise_generator(key, 3))
    again = DP([zero], layers, [2], clip=2.0, noise_multiplier=0.5, sampled=4, rng=noise_generator(key, 3))
    other = DP([zero], layers, [2], clip=2.0, noise_multiplier=0.5, sampled=4, rng=noise_generator(key, 4))
    noise = first.global_state["big"].dense()
    assert np.std(noise) == pytest.approx(0.5 * 2.0 / 4, rel=0.02) and abs(np.mean(noise)) < 1e-2
    np.testing.assert_array_equal(noise, again.global_state["big"].dense())
    assert not np.allclose(noise, other.global_state["big"].dense())
    assert not np.array_equal(new_key(), key)


def _classic_bound(rounds: int, z: float, delta: float) -> float:
    """ε from the Gaussian mechanism's RDP α/(2σ²) (σ = z/2: replace-one doubles the sensitivity), composed over
    `rounds` without subsampling, converted with ε = RDP + log(1/δ)/(α − 1) at the best order."""
    orders = np.linspace(1.01, 512, 200_000)
    return float(np.min(rounds * orders * 2 / z**2 + math.log(1 / delta) / (orders - 1)))


def test_accountant_matches_the_gaussian_mechanism_and_grows_with_rounds_and_sampling() -> None:
    full = np.array([[10, 10, 4.0]] * 5)
    spent = epsilon(full, 1e-3)
    assert 0.8 * _classic_bound(5, 4.0, 1e-3) <= spent <= _classic_bound(5, 4.0, 1e-3)
    sampled = np.array([[100, 10, 4.0]] * 5)
    assert epsilon(sampled, 1e-3) < spent
    assert epsilon(np.array([[100, 10, 4.0]] * 50), 1e-3) > epsilon(sampled, 1e-3)
    assert epsilon(np.array([[100, 10, 8.0]] * 5), 1e-3) < epsilon(sampled, 1e-3)
    assert epsilon(np.array([[100, 10, 4.0], [100, 10, 0.0]]), 1e-3) == math.inf
    np.testing.assert_array_equal(Sampling(100, 10, resampled=True).ledger_row(4.0), [[100, 100, 4.0]])
    with pytest.raises(ValueError, match="between 1 and the 5"):
        Sampling(5, 6).ledger_row(1.0)
    with pytest.raises(ValueError, match="clip"):
        DpSettings(0.0, 1.0)


def test_the_server_step_takes_the_private_head_and_keeps_the_ledger_and_the_key() -> None:
    rng = np.random.default_rng(1)
    params = {f"{n}::W": np.zeros((40, 30), np.float32) for n in LAYERS} | {HEAD + "w": np.zeros(3, np.float32)}
    state = ServerState("exact", 0, params, {KEY: new_key()})
    filler = {n: rng.standard_normal((4, 30)).astype(np.float32) for n in LAYERS}
    sent, _ = tier_adapters(state, LAYERS, RANKS, filler)
    trained = {}
    for i, rank in enumerate((2, 4)):
        lora = {n: (a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), b + 0.1) for n, (a, b) in
                sent[rank].lora.items()}
        trained[f"c{i}"] = (AdapterHeader(federation="f", round=1, client_id=f"c{i}", rank=rank, num_samples=5,
                                          dtype="float32"), Adapter(rank, lora, {"w": np.full(3, 0.2, np.float32)}))
    privacy = DpSettings(clip=1e9, noise_multiplier=0.0)
    sgd = ServerOptimizer("sgd", lr=1.0, beta1=0.0)
    _, _, new = merge_with_server("dp-fedavg", trained, sent, state, sgd, _Manifest(LAYERS, RANKS), filler, privacy=privacy,
                                  sampling=Sampling(50, 4))
    np.testing.assert_allclose(new.params[HEAD + "w"], np.full(3, 2 * 0.2 / 4), rtol=1e-6)
    np.testing.assert_array_equal(new.moments[LEDGER], [[50, 4, 0.0]])
    np.testing.assert_array_equal(new.moments[KEY], state.moments[KEY])
    restored = ServerState.from_bytes(new.to_bytes(), "exact")
    np.testing.assert_array_equal(restored.moments[LEDGER], new.moments[LEDGER])
    with pytest.raises(ValueError, match="privacy settings"):
        merge_with_server("dp-fedavg", trained, sent, state, sgd, _Manifest(LAYERS, RANKS), filler, sampling=Sampling(50, 4))


@pytest.mark.parametrize(("strategy", "server", "privacy", "statistics", "message"), [
    ("dp-fedavg", True, None, False, "needs its clip norm"),
    ("svd-weighted", True, DpSettings(1.0, 1.0), False, "adds no noise"),
    ("dp-fedavg", False, DpSettings(1.0, 1.0), False, "give a server optimizer"),
    ("dp-fedavg", True, DpSettings(1.0, 1.0), True, "closed-form head"),
])
def test_privacy_options_are_checked_before_a_round(tmp_path, strategy, server, privacy, statistics, message) -> None:
    options = AggregatorOptions(federation="f", rounds=1, state_dir=tmp_path, strategy=strategy,
                                server_optimizer=ServerOptimizer("sgd", lr=1.0) if server else None, privacy=privacy,
                                training=TrainingConfig(feature_statistics=statistics))
    with pytest.raises(ValueError, match=message):
        check_privacy_options(options)
