"""The server update rule (FedAvgM on ΔW_g): against a dense reference, its special cases, its persistence."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.round_merge import check_strategy
from aggregator.server_update import ServerOptimizer, ServerState, apply_update, initial_state
from aggregator.state import StateDir
from aggregator.strategies import get_strategy
from tests.test_strategies import make_layers, make_update, tier_delta, truncate


def dense_reference(rounds, layers, name, lr, momentum, strategy="svd-weighted"):
    """FedAvgM written densely: Δ = Σ w_i (ΔW_i − T_{r_i}(G)), m = βm + Δ, G += ηm."""
    spec = layers[name]
    g = np.zeros((spec.out_features, spec.in_features))
    m = np.zeros_like(g)
    for updates in rounds:
        result = get_strategy(strategy)(updates, layers, sorted({u.rank for u in updates}))
        start = sum(result.weights[name][u.client_id] * truncate(g, u.rank) for u in updates)
        m = momentum * m + result.global_state[name].dense() - start
        g = g + lr * m
    return g


def run_rule(rounds, layers, rule, ranks):
    state = initial_state(layers, {})
    tiers = None
    for updates in rounds:
        result = get_strategy("svd-weighted")(updates, layers, ranks)
        tiers, state = apply_update(rule, state, result, {u.client_id: u.rank for u in updates}, {}, layers, ranks)
    return tiers, state


@pytest.mark.parametrize("lr,momentum", [(1.0, 0.0), (1.5, 0.9), (0.5, 0.5)])
def test_rule_matches_the_dense_fedavgm_reference_over_heterogeneous_rounds(lr, momentum) -> None:
    rng = np.random.default_rng(3)
    layers = make_layers(out=30, inn=20)
    ranks = [2, 4, 8]
    rounds = [[make_update(f"c{i}", r, n, layers, rng) for i, (r, n) in enumerate(clients)]
              for clients in ([(2, 10), (8, 30)], [(4, 20), (2, 5), (8, 7)], [(2, 40)])]
    _, state = run_rule(rounds, layers, ServerOptimizer(lr, momentum, rank=20), ranks)
    for name in layers:
        expected = dense_reference(rounds, layers, name, lr, momentum)
        assert np.linalg.norm(state.global_factors[name].dense() - expected) <= 1e-9 * np.linalg.norm(expected)


def test_one_tier_lr_1_without_momentum_is_the_strategys_own_merge() -> None:
    rng = np.random.default_rng(4)
    layers = make_layers()
    updates = [make_update(c, 4, n, layers, rng) for c, n in (("a", 10), ("b", 30), ("c", 5))]
    tiers, _ = run_rule([updates], layers, ServerOptimizer(), [4])
    plain = get_strategy("svd-weighted")(updates, layers, [4])
    for name in layers:
        got = layers[name].scaling(4) * tiers[4][name][1] @ tiers[4][name][0]
        np.testing.assert_allclose(got, tier_delta(plain, layers, 4, name), atol=1e-10)


def test_components_low_tier_clients_never_received_are_kept_not_shrunk() -> None:
    rng = np.random.default_rng(5)
    layers = make_layers(out=16, inn=16, count=1)
    first = [make_update("hi", 8, 10, layers, rng)]
    second = [make_update("lo", 2, 10, layers, rng)]
    _, after_first = run_rule([first], layers, ServerOptimizer(rank=16), [2, 8])
    _, after_both = run_rule([first, second], layers, ServerOptimizer(rank=16), [2, 8])
    g1 = after_first.global_factors["l0"].dense()
    client = layers["l0"].scaling(2) * second[0].factors["l0"][1] @ second[0].factors["l0"][0]
    np.testing.assert_allclose(after_both.global_factors["l0"].dense(), g1 - truncate(g1, 2) + client, atol=1e-10)
    plain = get_strategy("svd-weighted")(second, layers, [2, 8]).global_state["l0"].dense()
    assert np.linalg.matrix_rank(plain) == 2, "replacement forgets the high-tier components; the rule keeps them"


def test_head_follows_the_same_rule_from_the_bundles_initial_head() -> None:
    rng = np.random.default_rng(6)
    layers = make_layers(count=1)
    head0 = {"w": np.ones((2, 3), np.float32)}
    state = initial_state(layers, head0)
    updates = [make_update("a", 4, 10, layers, rng)]
    result = get_strategy("svd-weighted")(updates, layers, [4])
    rule = ServerOptimizer(lr=2.0, momentum=0.5)
    merged = {"w": np.full((2, 3), 1.5, np.float32)}
    _, state = apply_update(rule, state, result, {"a": 4}, merged, layers, [4])
    np.testing.assert_allclose(state.head["w"], 1 + 2.0 * 0.5)
    _, state = apply_update(rule, state, result, {"a": 4}, {"w": state.head["w"]}, layers, [4])
    np.testing.assert_allclose(state.head["w"], 2 + 2.0 * 0.5 * 0.5)


def test_server_state_round_trips_through_the_state_dir(tmp_path) -> None:
    rng = np.random.default_rng(7)
    layers = make_layers()
    updates = [make_update("a", 4, 10, layers, rng), make_update("b", 2, 10, layers, rng)]
    _, state = run_rule([updates], layers, ServerOptimizer(momentum=0.9), [2, 4])
    state.head = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state.head_momentum = {"w": np.ones((2, 3), np.float32)}
    store = StateDir(tmp_path)
    assert store.server_state(1) is None
    store.save_server_state(1, state)
    loaded = store.server_state(1)
    assert isinstance(loaded, ServerState)
    for name in layers:
        np.testing.assert_allclose(loaded.global_factors[name].dense(), state.global_factors[name].dense(), atol=1e-5)
        np.testing.assert_allclose(loaded.momentum[name].dense(), state.momentum[name].dense(), atol=1e-5)
    np.testing.assert_array_equal(loaded.head["w"], state.head["w"])
    np.testing.assert_array_equal(loaded.head_momentum["w"], state.head_momentum["w"])


def test_bad_settings_and_inexact_strategies_are_refused() -> None:
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        ServerOptimizer(lr=0.0)
    check_strategy("flexlora", ServerOptimizer())
    with pytest.raises(ValueError, match="exactly"):
        check_strategy("fedavg-naive", ServerOptimizer())
