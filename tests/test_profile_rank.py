"""Device profile (real probes in child processes) and the rank formula, snapping and memory lowering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.profile import PRESETS, ProbeCache, TierProbe, profile_device
from edge_sdk.protocol import FederationConfig, TrainingConfig, decode_message, encode_message
from edge_sdk.protocol.ranking import DeviceProfile
from edge_sdk.rank import InsufficientMemoryError, RankPolicy, choose_rank

GIB = 2**30


def _profile(memory: float = 2 * GIB, compute: float = 2.0, samples: int = 500) -> DeviceProfile:
    return DeviceProfile(memory_bytes=int(memory), compute=compute, num_samples=samples, cpu_cores=2, threads=2,
                         device="cpu", providers=["CPUExecutionProvider"])


def test_formula_matches_the_definition() -> None:
    policy = RankPolicy(r_max=16, lambdas=(0.5, 0.2, 0.3), m_max=4.0 * GIB, c_max=4.0, d_max=1000)
    profile = _profile(memory=1 * GIB, compute=2.0, samples=250)
    expected = 16 * (0.5 * GIB + 0.2 * 2.0 + 0.3 * 250) / (0.5 * 4 * GIB + 0.2 * 4.0 + 0.3 * 1000)
    assert policy.raw_rank(profile) == int(expected)
    balanced = RankPolicy.balanced(16, m_max=4 * GIB, c_max=4.0, d_max=1000)
    assert balanced.raw_rank(_profile(1 * GIB, 2.0, 250)) == int(16 * (0.25 + 0.5 + 0.25) / 3)
    assert balanced.raw_rank(_profile(64 * GIB, 100.0, 10**6)) == 16, "values are capped at the normalizers"
    announced = FederationConfig(federation="f", bundle_id="b", ranks=[2, 16], rank_policy=balanced, head="shared",
                                 dtype="float32", chunk_size=1 << 20, training=TrainingConfig(), rounds=1)
    assert decode_message(encode_message(announced), FederationConfig).rank_policy == balanced
    with pytest.raises(ValueError):
        RankPolicy(16, (0.0, 0.0, 0.0), 1.0, 1.0, 1.0)


def test_snaps_down_to_a_tier_and_lowers_until_memory_fits() -> None:
    measured = {2: 300e6, 4: 320e6, 8: 400e6, 16: 500e6}
    calls: list[int] = []

    def measure(rank: int) -> TierProbe:
        calls.append(rank)
        return TierProbe(rank, int(measured[rank]), 1.0)

    policy = RankPolicy.balanced(16, m_max=1e9, c_max=2.0, d_max=500)
    roomy = choose_rank(_profile(memory=1e9, compute=2.0, samples=500), policy, [2, 4, 8, 16], measure)
    assert (roomy.rank, roomy.raw_rank, roomy.too_big) == (16, 16, [])
    calls.clear()
    tight = choose_rank(_profile(memory=350e6, compute=2.0, samples=500), policy, [2, 4, 8, 16], measure)
    assert tight.formula_tier == 8 and tight.rank == 4 and tight.too_big == [8] and calls == [8, 4]
    weak = choose_rank(_profile(memory=1e9, compute=0.0, samples=1), RankPolicy.balanced(16, 1e12, 2.0, 500),
                       [4, 8], measure)
    assert weak.raw_rank == 0 and weak.rank == 4, "never below the smallest tier"
    with pytest.raises(InsufficientMemoryError, match=r"needs 286 MiB .* only 191 MiB is available"):
        choose_rank(_profile(memory=200e6), policy, [2, 4, 8, 16], measure)


def test_real_profiles_under_presets_and_the_probe_cache(minilm_bundle: Path, tmp_path: Path) -> None:
    examples = rotten_tomatoes()[:200]
    cache = ProbeCache(tmp_path / "probes.json")
    low, prober = profile_device(minilm_bundle, examples, preset="low", cache=cache)
    high, _ = profile_device(minilm_bundle, examples, preset="high", cache=cache)
    assert (low.threads, low.preset, high.threads, high.preset) == (1, "low", 2, "high")
    assert low.memory_bytes <= PRESETS["low"].memory_bytes and low.num_samples == 200
    assert 0 < low.compute < high.compute, (low.compute, high.compute)
    assert "CPUExecutionProvider" in low.providers
    probe = prober(2)
    assert 100 * 2**20 < probe.peak_rss_bytes < 2 * GIB and probe.steps_per_second > 0
    entries = json.loads(cache.path.read_text())
    assert len(entries) == 2, "one measurement per thread count, then reused"
    policy = RankPolicy.balanced(8, m_max=4 * GIB, c_max=high.compute, d_max=200)
    choice = choose_rank(high, policy, prober.manifest.ranks, prober)
    assert choice.rank in (2, 8) and choice.memory_needed_bytes <= high.memory_bytes
