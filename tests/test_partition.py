"""Partitioner properties on the real Rotten Tomatoes labels: a disjoint cover, seeded, α → ∞ is IID."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.datasets import rotten_tomatoes
from fedpeft_sim.partition import client_sizes, histograms, partition
from fedpeft_sim.simulation import assign_presets

LABELS = np.array([e.label for e in rotten_tomatoes()])


@settings(max_examples=25, deadline=None)
@given(clients=st.integers(1, 150), alpha=st.one_of(st.none(), st.floats(0.01, 100.0)), seed=st.integers(0, 2**16),
       skew=st.sampled_from([0.0, 0.5, 1.5]))
def test_every_sample_goes_to_exactly_one_client(clients: int, alpha: float | None, seed: int, skew: float) -> None:
    parts = partition(LABELS, clients, alpha, seed, size_skew=skew, min_size=4)
    assert len(parts) == clients
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)
    assert min(len(p) for p in parts) >= 4


def test_the_same_seed_gives_the_same_split_and_another_seed_another() -> None:
    first = partition(LABELS, 50, 0.1, seed=7, size_skew=0.5)
    again = partition(LABELS, 50, 0.1, seed=7, size_skew=0.5)
    other = partition(LABELS, 50, 0.1, seed=8, size_skew=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_large_alpha_approaches_iid_and_small_alpha_skews_labels() -> None:
    prior = LABELS.mean()

    def label_share_spread(alpha: float | None) -> float:
        counts = np.array(histograms(LABELS, partition(LABELS, 40, alpha, seed=3), 2))
        return float(np.abs(counts[:, 1] / counts.sum(axis=1) - prior).mean())

    iid, huge, one, tenth = (label_share_spread(a) for a in (None, 1e4, 1.0, 0.1))
    assert huge < 0.04 and iid < 0.04, (huge, iid)
    assert huge < one < tenth, (huge, one, tenth)
    counts = np.array(histograms(LABELS, partition(LABELS, 40, 0.1, seed=3), 2))
    dominated = (counts.max(axis=1) / counts.sum(axis=1) > 0.9).mean()
    assert dominated > 0.5, f"at α=0.1 most clients should hold almost one class, got {dominated:.0%}"


def test_size_skew_spreads_client_sizes_and_keeps_the_total() -> None:
    rng = np.random.default_rng(0)
    equal, skewed = client_sizes(1000, 10, 0.0, rng), client_sizes(1000, 10, 1.0, rng, min_size=5)
    assert equal.sum() == skewed.sum() == 1000 and set(equal.tolist()) == {100}
    assert skewed.min() >= 5 and skewed.max() > 2 * skewed.min()


def test_bad_arguments_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(LABELS, 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="at least 4"):
        partition(LABELS[:10], 5, None, seed=0, min_size=4)
    with pytest.raises(ValueError, match="Tier mix"):
        assign_presets({"tiny": 1.0}, 3, np.random.default_rng(0))


def test_presets_follow_the_mix() -> None:
    names = assign_presets({"low": 1, "mid": 1, "high": 2}, 100, np.random.default_rng(0))
    assert (names.count("low"), names.count("mid"), names.count("high")) == (25, 25, 50)
