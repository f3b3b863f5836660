"""Properties of the aggregation strategies on random heterogeneous-rank adapters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.bounds import NORM_CAP, SHARE_CAP
from aggregator.strategies import STRATEGIES, ClientUpdate, LayerSpec, MergeError, get_strategy, linalg
from aggregator.strategies.linalg import svd_of_product

RANKS = (2, 4, 8)
EXACT = ("svd-weighted", "flexlora")


def make_layers(out: int = 12, inn: int = 7, count: int = 2, alpha: float = 16.0) -> dict[str, LayerSpec]:
    return {f"l{i}": LayerSpec(f"l{i}", inn, out, alpha) for i in range(count)}


def make_update(cid: str, rank: int, n: int, layers: dict[str, LayerSpec], rng: np.random.Generator,
                dtype=np.float64) -> ClientUpdate:
    factors = {
        name: (rng.standard_normal((rank, s.in_features)).astype(dtype),
               rng.standard_normal((s.out_features, rank)).astype(dtype))
        for name, s in layers.items()
    }
    return ClientUpdate(cid, rank, n, factors)


def merge(name: str, updates: list[ClientUpdate], layers: dict[str, LayerSpec]):
    """Strategy `name` on `updates` at RANKS; a private one runs noiseless, with a clip no update reaches, against a
    zero global (so each update is the adapter itself)."""
    spec = get_strategy(name)
    if not spec.private:
        return spec(updates, layers, RANKS)
    sent = [replace(u, sent={k: (np.zeros_like(a), np.zeros_like(b)) for k, (a, b) in u.factors.items()})
            for u in updates]
    return spec(sent, layers, RANKS, clip=1e12, noise_multiplier=0.0, sampled=len(updates),
                rng=np.random.default_rng(0))


def delta(update: ClientUpdate, layers: dict[str, LayerSpec], name: str) -> np.ndarray:
    a, b = update.factors[name]
    return layers[name].scaling(update.rank) * b.astype(np.float64) @ a.astype(np.float64)


def tier_delta(result, layers, rank: int, name: str) -> np.ndarray:
    a, b = result.tiers[rank][name]
    return layers[name].scaling(rank) * b @ a


def exact_svd_weighted(updates, layers, name) -> np.ndarray:
    """Σ w_i c_i ΔW_i with c_i clipping each ‖ΔW_i‖ to NORM_CAP × the low median norm and w_i ∝ n_i‖c_i ΔW_i‖,
    each w_i at most SHARE_CAP × the low median share before the shares are summed to 1 again."""
    d = [delta(u, layers, name) for u in updates]
    norms = np.array([np.linalg.norm(x) for x in d])
    limit = NORM_CAP * np.sort(norms)[(len(norms) - 1) // 2]
    clip = np.minimum(1.0, limit / norms)
    raw = np.array([u.num_samples for u in updates]) * norms * clip
    shares = np.minimum(raw / raw.sum(), SHARE_CAP * np.sort(raw / raw.sum())[(len(raw) - 1) // 2])
    return sum(w * c * x for w, c, x in zip(shares / shares.sum(), clip, d))


def truncate(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


BACKENDS = [pytest.param(linalg.numpy_backend, id="numpy"), pytest.param(linalg.torch_backend, id="torch")]


@pytest.fixture
def merge_backend(monkeypatch):
    """Select the merge's linalg backend by name, as FEDPEFT_MERGE_BACKEND does."""
    def select(name: str) -> linalg.Backend:
        monkeypatch.setenv(linalg.BACKEND_ENV, name)
        linalg.default_backend.cache_clear()
        return linalg.default_backend()
    yield select
    linalg.default_backend.cache_clear()


clients_st = st.lists(st.tuples(st.sampled_from(RANKS), st.integers(1, 500)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(clients=clients_st, seed=st.integers(0, 2**16), shape=st.sampled_from([(12, 7), (7, 12), (20, 20)]))
def test_svd_weighted_equals_dense_reference_and_eckart_young(clients, seed, shape) -> None:
    rng = np.random.default_rng(seed)
    layers = make_layers(*shape)
    updates = [make_update(f"c{i}", r, n, layers, rng) for i, (r, n) in enumerate(clients)]
    result = get_strategy("svd-weighted")(updates, layers, RANKS)
    for name in layers:
        expected = exact_svd_weighted(updates, layers, name)
        np.testing.assert_allclose(result.global_state[name].dense(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())
        for r in RANKS:
            assert result.tiers[r][name][0].shape == (r, layers[name].in_features)
            assert result.tiers[r][name][1].shape == (layers[name].out_features, r)
            np.testing.assert_allclose(tier_delta(result, layers, r, name), truncate(expected, r),
                                       atol=1e-8 * max(1.0, np.abs(expected).max()))
        assert sum(result.weights[name].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", EXACT)
def test_one_client_and_identical_clients_return_its_delta(name) -> None:
    rng = np.random.default_rng(1)
    layers = make_layers()
    one = make_update("a", 4, 10, layers, rng)
    for updates in ([one], [ClientUpdate(f"c{i}", 4, 10, one.factors) for i in range(5)]):
        result = get_strategy(name)(updates, layers, RANKS)
        for layer in layers:
            np.testing.assert_allclose(tier_delta(result, layers, 4, layer), delta(one, layers, layer), atol=1e-10)
            np.testing.assert_allclose(tier_delta(result, layers, 8, layer), delta(one, layers, layer), atol=1e-10)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_permutation_of_clients_does_not_change_the_result(name) -> None:
    rng = np.random.default_rng(2)
    layers = make_layers()
    updates = [make_update(f"c{i}", r, 10 + i, layers, rng) for i, r in enumerate((2, 4, 8, 4))]
    if name == "ffa-lora":
        shared = updates[2].factors
        updates = [ClientUpdate(u.client_id, u.rank, u.num_samples,
                                {k: (shared[k][0][: u.rank], b) for k, (_, b) in u.factors.items()}) for u in updates]
    forward = merge(name, updates, layers)
    backward = merge(name, updates[::-1], layers)
    for r in RANKS:
        for layer in layers:
            np.testing.assert_allclose(tier_delta(forward, layers, r, layer), tier_delta(backward, layers, r, layer),
                                       atol=1e-9)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_zero_updates_give_a_defined_zero_result(name) -> None:
    layers = make_layers()
    zeros = {k: (np.zeros((4, s.in_features)), np.zeros((s.out_features, 4))) for k, s in layers.items()}
    updates = [ClientUpdate("a", 4, 3, zeros), ClientUpdate("b", 4, 5, zeros)]
    result = merge(name, updates, layers)
    for layer in layers:
        assert sum(result.weights[layer].values()) == pytest.approx(1.0)
        for r in RANKS:
            a, b = result.tiers[r][layer]
            assert np.isfinite(a).all() and np.isfinite(b).all()
            if name != "flora":
                assert np.abs(layers[layer].scaling(r) * b @ a).max() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(out=st.integers(3, 40), inn=st.integers(3, 40), rank=st.integers(1, 60), layers=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_factored_svd_matches_dense_including_wide_stacks(backend, out, inn, rank, layers, seed) -> None:
    rng = np.random.default_rng(seed)
    for dtype, tol in ((np.float64, 1e-5), (np.float32, 1e-4)):
        p = rng.standard_normal((layers, out, rank)).astype(dtype)
        q = rng.standard_normal((layers, rank, inn)).astype(dtype)
        for i, factors in enumerate(svd_of_product(p, q, backend=backend())):
            assert factors.u.dtype == dtype and isinstance(factors.s, np.ndarray)
            dense = p[i].astype(np.float64) @ q[i].astype(np.float64)
            err = np.linalg.norm(factors.dense() - dense) / np.linalg.norm(dense)
            assert err <= tol
            np.testing.assert_allclose(factors.s, np.linalg.svd(dense, compute_uv=False)[: len(factors.s)],
                                       rtol=tol, atol=tol * np.linalg.norm(dense))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_gram_svd_of_rank_deficient_matrices_is_sorted_and_exact(backend, shape) -> None:
    """A rank-3 matrix leaves a null space whose norms are rounding noise in any order: the
    singular values must still come out sorted, and U Σ Vᵀ must still reproduce the matrix."""
    be = backend()
    rng = np.random.default_rng(5)
    m = rng.standard_normal((4, shape[0], 3)) @ rng.standard_normal((4, 3, shape[1]))
    u, s, v = (be.numpy(x) for x in linalg.svd_by_gram(be.asarray(m), be.xp))
    assert np.all(s[:, 1:] <= s[:, :-1])
    np.testing.assert_allclose((u * s[:, None, :]) @ np.swapaxes(v, 1, 2), m, atol=1e-10)
    np.testing.assert_allclose(s[:, :3], np.linalg.svd(m, compute_uv=False)[:, :3], rtol=1e-10)


@pytest.mark.parametrize("name", EXACT)
def test_numpy_and_torch_backends_merge_alike(name, merge_backend) -> None:
    rng = np.random.default_rng(11)
    layers = make_layers(out=40, inn=30, count=3)
    updates = [make_update(f"c{i}", RANKS[i % 3], 10 + i, layers, rng, np.float32) for i in range(12)]
    results = {}
    for backend in ("numpy", "torch"):
        assert merge_backend(backend).name.startswith(backend)
        results[backend] = get_strategy(name)(updates, layers, RANKS)
    for layer in layers:
        for r in RANKS:
            np.testing.assert_allclose(tier_delta(results["torch"], layers, r, layer),
                                       tier_delta(results["numpy"], layers, r, layer), rtol=0, atol=1e-4)
        assert results["torch"].weights[layer] == pytest.approx(results["numpy"].weights[layer], rel=1e-6)


def test_backend_choice_is_explicit(merge_backend) -> None:
    assert merge_backend("numpy").xp.__name__ == "array_api_compat.numpy"
    assert merge_backend("auto").name in ("torch-cpu", "torch-cuda")
    with pytest.raises(ValueError, match="use auto, numpy or torch"):
        merge_backend("mkl")


def test_orientation_of_non_square_layers() -> None:
    rng = np.random.default_rng(3)
    layers = make_layers(out=30, inn=5, count=1)
    update = make_update("a", 2, 1, layers, rng)
    result = get_strategy("svd-weighted")([update], layers, (2,))
    a, b = result.tiers[2]["l0"]
    assert a.shape == (2, 5) and b.shape == (30, 2)
    np.testing.assert_allclose(layers["l0"].scaling(2) * b @ a, delta(update, layers, "l0"), atol=1e-10)
    transposed = (layers["l0"].scaling(2) * b @ a).T
    assert transposed.shape != delta(update, layers, "l0").shape


def test_naive_averaging_has_cross_terms_exact_strategies_do_not() -> None:
    rng = np.random.default_rng(4)
    layers = make_layers(count=1)
    updates = [make_update("a", 8, 10, layers, rng), make_update("b", 8, 10, layers, rng)]
    exact = 0.5 * delta(updates[0], layers, "l0") + 0.5 * delta(updates[1], layers, "l0")
    naive = get_strategy("fedavg-naive")(updates, layers, (8,))
    flex = get_strategy("flexlora")(updates, layers, (8, 16))
    naive_err = np.linalg.norm(tier_delta(naive, layers, 8, "l0") - exact) / np.linalg.norm(exact)
    assert naive_err > 0.3
    np.testing.assert_allclose(flex.tiers[16]["l0"][1] @ flex.tiers[16]["l0"][0] * layers["l0"].scaling(16), exact,
                               atol=1e-10)
    flora = get_strategy("flora")(updates, layers, (8,))
    p, q = flora.base_delta["l0"]
    np.testing.assert_allclose(p @ q, exact, atol=1e-10)


def test_ffa_lora_averages_b_under_a_shared_a_and_rejects_a_changed_a() -> None:
    rng = np.random.default_rng(5)
    layers = make_layers(count=1)
    shared_a = rng.standard_normal((8, 7))
    ups = [ClientUpdate(c, r, n, {"l0": (shared_a[:r], rng.standard_normal((12, r)))})
           for c, r, n in (("a", 8, 10), ("b", 4, 15))]
    rogue = ClientUpdate("z", 4, 5, {"l0": (rng.standard_normal((4, 7)), rng.standard_normal((12, 4)))})
    result = get_strategy("ffa-lora")([*ups, rogue], layers, (4, 8))
    assert "shared frozen A" in result.rejected["z"]
    b_expected = np.zeros((12, 8))
    b_expected[:, :8] += 0.4 * ups[0].factors["l0"][1]
    b_expected[:, :4] += 0.6 * ups[1].factors["l0"][1]
    np.testing.assert_allclose(result.tiers[8]["l0"][1], b_expected)
    np.testing.assert_allclose(result.tiers[8]["l0"][0], shared_a)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bad_updates_are_rejected_with_reasons_and_the_rest_merge(name) -> None:
    rng = np.random.default_rng(6)
    layers = make_layers()
    good = make_update("good", 4, 10, layers, rng)
    nan = make_update("nan", 4, 10, layers, rng)
    nan.factors["l0"][0][0, 0] = np.nan
    inf = make_update("inf", 4, 10, layers, rng)
    inf.factors["l1"][1][1, 1] = np.inf
    wrong_shape = ClientUpdate("shape", 4, 10, {k: (a[:, :-1], b) for k, (a, b) in good.factors.items()})
    wrong_rank = ClientUpdate("rank", 8, 10, good.factors)
    undeclared = ClientUpdate("tier", 3, 10, {k: (a[:3], b[:, :3]) for k, (a, b) in good.factors.items()})
    unknown = ClientUpdate("unknown", 4, 10, {**good.factors, "ghost": good.factors["l0"]})
    missing = ClientUpdate("missing", 4, 10, {"l0": good.factors["l0"]})
    no_samples = ClientUpdate("n0", 4, 0, good.factors)
    updates = [good, nan, inf, wrong_shape, wrong_rank, undeclared, unknown, missing, no_samples]
    result = merge(name, updates, layers)
    assert set(result.rejected) == {u.client_id for u in updates[1:]}
    assert "NaN or Inf" in result.rejected["nan"] and "NaN or Inf" in result.rejected["inf"]
    assert "do not match rank" in result.rejected["shape"] and "do not match rank" in result.rejected["rank"]
    assert "not an exported tier" in result.rejected["tier"]
    assert "unknown layers ['ghost']" in result.rejected["unknown"]
    assert "missing layers ['l1']" in result.rejected["missing"]
    assert "positive integer" in result.rejected["n0"]
    assert all(list(w) == ["good"] for w in result.weights.values())
    with pytest.raises(MergeError, match="no valid update"):
        merge(name, updates[1:], layers)


def test_unknown_strategy_name_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="svd-weighted"):
        get_strategy("fedsgd")
