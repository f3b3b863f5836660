"""The server's global state and optimizers: steps, tiers from the state, exact update merges, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.bounds import NORM_CAP, SHARE_CAP
from aggregator.round_merge import merge_with_server
from aggregator.server_state import ServerOptimizer, ServerState, initial_state, step, tier_adapters
from aggregator.strategies import LayerSpec
from edge_sdk.protocol import Adapter, AdapterHeader

LAYERS = {"l0": LayerSpec("l0", 10, 12, 16.0), "l1": LayerSpec("l1", 10, 12, 16.0)}
RANKS = [2, 4]


class _Manifest:
    """The two facts of a bundle manifest that the merge reads: tiers and the LoRA pairs' shapes."""

    def __init__(self, layers: dict[str, LayerSpec] = LAYERS, ranks: list[int] = RANKS) -> None:
        from edge_sdk.protocol.manifest import LoraPair, Tier

        self.ranks = ranks
        self.tiers = [Tier(rank=r, dir="", training_model="", eval_model="", optimizer_model="", checkpoint="",
                           trainable_init="", inference_model="", parameter_order=[], trainable=[], trainable_count=0,
                           lora_pairs=[LoraPair(n, f"{n}.A", f"{n}.B", [r, s.in_features], [s.out_features, r],
                                                s.alpha / r) for n, s in layers.items()],
                           parity_max_abs_diff=None) for r in ranks]


def _start(rng: np.random.Generator, head: bool = True) -> Adapter:
    lora = {n: (rng.standard_normal((4, 10)).astype(np.float32) * 0.3, np.zeros((12, 4), np.float32)) for n in LAYERS}
    return Adapter(4, lora, {"w": np.zeros((2, 12), np.float32), "b": np.zeros(2, np.float32)} if head else {})


def test_adam_step_matches_its_definition() -> None:
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    state = ServerState("exact", 0, {"x": np.zeros(3, np.float32)}, {})
    grads = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0])]
    m = v = np.zeros(3)
    x = np.zeros(3)
    for t, g in enumerate(grads, 1):
        state = step(state, {"x": g}, opt)
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        x = x + 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    np.testing.assert_allclose(state.params["x"], x, rtol=1e-6)
    sgd = step(ServerState("exact", 0, {"x": np.ones(2, np.float32)}, {}), {"x": np.array([1.0, -1.0])},
               ServerOptimizer("sgd", lr=2.0, beta1=0.0))
    np.testing.assert_array_equal(sgd.params["x"], [3.0, -1.0])
    with pytest.raises(ValueError, match="positive lr"):
        ServerOptimizer("adam", lr=float("nan"))


def test_cosine_schedule_anneals_both_learning_rates_to_the_floor_by_the_last_round() -> None:
    opt = ServerOptimizer("sgd", lr=2.0, head_lr=0.5, beta1=0.0, schedule="cosine", horizon=5, lr_floor=0.1)
    state = ServerState("exact", 0, {"x": np.zeros(1, np.float32), "head::b": np.zeros(1, np.float32)}, {})
    moves = []
    for _ in range(7):
        before = state.params
        state = step(state, {"x": np.ones(1), "head::b": np.ones(1)}, opt)
        moves.append((float(state.params["x"][0] - before["x"][0]), float(state.params["head::b"][0] - before["head::b"][0])))
    np.testing.assert_allclose(moves[0], [2.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(moves[2], [2.0 * 0.55, 0.5 * 0.55], rtol=1e-6)
    np.testing.assert_allclose(moves[4:], [[0.2, 0.05]] * 3, rtol=1e-6)
    assert all(a[0] > b[0] for a, b in zip(moves[:4], moves[1:5]))
    assert ServerOptimizer("adam", lr=1e-3).lr_factor(10_000) == 1.0
    with pytest.raises(ValueError, match="horizon"):
        ServerOptimizer("adam", schedule="cosine")
    with pytest.raises(ValueError, match="lr_floor"):
        ServerOptimizer("adam", schedule="cosine", horizon=10, lr_floor=1.5)


def test_adafactor_keeps_a_low_rank_update_low_rank_where_adam_spreads_it() -> None:
    rng = np.random.default_rng(3)
    g = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 10))
    start = ServerState("exact", 0, {"w": np.zeros((12, 10), np.float32)}, {})
    ranks = {}
    for name in ("adafactor", "adam"):
        moved = step(start, {"w": g}, ServerOptimizer(name, lr=1e-2))
        ranks[name] = np.linalg.matrix_rank(moved.params["w"].astype(np.float64), tol=1e-6)
    assert ranks["adafactor"] == 2 and ranks["adam"] > 2, ranks
    bias = step(ServerState("exact", 0, {"b": np.zeros(3, np.float32)}, {}), {"b": np.array([1.0, -1.0, 0.5])},
                ServerOptimizer("adafactor", lr=0.1, eps=1e-12))
    np.testing.assert_allclose(bias.params["b"], [0.1, -0.1, 0.1], rtol=1e-5)


def test_exact_tiers_are_best_rank_r_with_unit_a_rows_and_live_filler_directions() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10))).astype(np.float32)
    state = ServerState("exact", 1, {"l0::W": w, "l1::W": np.zeros((12, 10), np.float32)}, {})
    filler = {n: rng.standard_normal((4, 10)).astype(np.float32) for n in LAYERS}
    tiers, svds = tier_adapters(state, LAYERS, RANKS, filler)
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    best2 = (u[:, :2] * s[:2]) @ vt[:2]
    a, b = tiers[2].lora["l0"]
    np.testing.assert_allclose(LAYERS["l0"].scaling(2) * b.astype(np.float64) @ a, best2, atol=1e-4)
    a4, b4 = tiers[4].lora["l0"]
    np.testing.assert_allclose(LAYERS["l0"].scaling(4) * b4.astype(np.float64) @ a4, w, atol=1e-4)
    np.testing.assert_allclose(a4 @ a4.T, np.eye(4), atol=1e-5)
    assert not b4[:, 3].any(), "the direction ΔW_g lacks starts with B = 0"
    zero_a, zero_b = tiers[4].lora["l1"]
    np.testing.assert_allclose(zero_a @ zero_a.T, np.eye(4), atol=1e-5)
    assert not zero_b.any()
    np.testing.assert_allclose(svds["l0"].s[:3], s[:3], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["svd-weighted", "flexlora", "fedavg-naive"])
def test_one_client_with_a_unit_sgd_step_adds_exactly_its_update(strategy: str) -> None:
    rng = np.random.default_rng(1)
    start = _start(rng)
    form = "exact" if strategy != "fedavg-naive" else "factors"
    state = initial_state(start, LAYERS, form)
    filler = {n: a for n, (a, _) in start.lora.items()}
    sent, _ = tier_adapters(state, LAYERS, RANKS, filler)
    trained = Adapter(2, {n: (a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                              rng.standard_normal(b.shape).astype(np.float32)) for n, (a, b) in sent[2].lora.items()},
                      {k: v + 1.0 for k, v in sent[2].head.items()})
    header = AdapterHeader("f", 1, "c0", 2, 30)
    unit = ServerOptimizer("sgd", lr=1.0, beta1=0.0)
    tiers, result, new = merge_with_server(strategy, {"c0": (header, trained)}, sent, state, unit, _Manifest(), filler)
    assert new.step == 1 and list(result.weights["l0"]) == ["c0"]
    for name, spec in LAYERS.items():
        (a, b), (a0, b0) = trained.lora[name], sent[2].lora[name]
        if form == "exact":
            update = spec.scaling(2) * (b.astype(np.float64) @ a - b0.astype(np.float64) @ a0)
            np.testing.assert_allclose(new.params[f"{name}::W"], state.params[f"{name}::W"] + update, atol=1e-5)
        else:
            np.testing.assert_allclose(new.params[f"{name}::A"][:2], a, atol=1e-6)
            np.testing.assert_allclose(new.params[f"{name}::A"][2:], state.params[f"{name}::A"][2:], atol=0)
            np.testing.assert_allclose(new.params[f"{name}::B"][:, :2], b, atol=1e-6)
    np.testing.assert_allclose(tiers[4].head["w"], 1.0)
    restored = ServerState.from_bytes(new.to_bytes(), form)
    assert restored.step == new.step and restored.params.keys() == new.params.keys()
    assert all(np.array_equal(restored.params[k], v) for k, v in new.params.items())


def test_a_hostile_head_update_counts_as_the_norm_and_share_caps_allow() -> None:
    """Three devices move the head by +1; the fourth claims 10^6 samples and moves it by +1000. Its change is
    clipped to NORM_CAP × the median (+2) and its share to SHARE_CAP × the median share (2/5): a unit step
    moves the head by 3/5 · 1 + 2/5 · 2 = 1.4, not by ~1000."""
    rng = np.random.default_rng(3)
    start = _start(rng)
    state = initial_state(start, LAYERS, "exact")
    filler = {n: a for n, (a, _) in start.lora.items()}
    sent, _ = tier_adapters(state, LAYERS, RANKS, filler)
    lora = {n: (a.copy(), b + 0.1) for n, (a, b) in sent[2].lora.items()}
    updates = {f"c{i}": (AdapterHeader("f", 1, f"c{i}", 2, 30), Adapter(2, lora, {k: v + 1.0 for k, v in sent[2].head.items()}))
               for i in range(3)}
    updates["mallory"] = (AdapterHeader("f", 1, "mallory", 2, 10**6),
                          Adapter(2, lora, {k: v + 1000.0 for k, v in sent[2].head.items()}))
    assert NORM_CAP == 2.0 and SHARE_CAP == 2.0
    tiers, _, _ = merge_with_server("svd-weighted", updates, sent, state, ServerOptimizer("sgd", lr=1.0, beta1=0.0),
                                    _Manifest(), filler)
    for value in tiers[4].head.values():
        np.testing.assert_allclose(value, 1.4, rtol=1e-6)


def test_a_low_tier_client_does_not_pull_the_global_to_its_truncation() -> None:
    """The replace merge moves ΔW_g to T_2(ΔW_g) when a rank-2 client returns what it got; the server state stays."""
    rng = np.random.default_rng(2)
    start = _start(rng, head=False)
    w = {n: (rng.standard_normal((12, 4)) @ rng.standard_normal((4, 10))).astype(np.float32) for n in LAYERS}
    state = ServerState("exact", 3, {f"{n}::W": v for n, v in w.items()}, {})
    filler = {n: a for n, (a, _) in start.lora.items()}
    sent, _ = tier_adapters(state, LAYERS, RANKS, filler)
    unchanged = Adapter(2, {n: (a.copy(), b.copy()) for n, (a, b) in sent[2].lora.items()})
    _, _, new = merge_with_server("svd-weighted", {"c0": (AdapterHeader("f", 4, "c0", 2, 10), unchanged)}, sent,
                                  state, ServerOptimizer("sgd", lr=1.0, beta1=0.0), _Manifest(), filler)
    for n in LAYERS:
        np.testing.assert_allclose(new.params[f"{n}::W"], w[n], atol=1e-5)


def test_a_corrupt_server_state_is_a_state_error_that_says_what_to_do(tmp_path) -> None:
    from aggregator.state import StateDir, StateError

    store = StateDir(tmp_path)
    store.save_server_state(3, initial_state(_start(np.random.default_rng(0)), LAYERS, "exact"))
    path = store.round_dir(3) / "server-state.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateError, match="unreadable .* new --state-dir"):
        store.server_state(3, "exact")
