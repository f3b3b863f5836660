"""The device's LoRA rank: the proposal's weighted formula, snapped to a tier, lowered until it fits.

r_i = floor(r_max · (λ1·M_i + λ2·C_i + λ3·D_i) / (λ1·M_max + λ2·C_max + λ3·D_max))
with M memory for training (bytes), C measured compute (steps/s), D local samples. Each value
is capped at its normalizer, so no device is told more than r_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from edge_sdk.profile import DeviceProfile, TierProbe


class InsufficientMemoryError(RuntimeError):
    """Even the smallest tier does not fit in the memory available for training."""


@dataclass(frozen=True)
class RankPolicy:
    """λ's, r_max and the normalizers; the federation's config, announced by the aggregator.

    The λ's multiply raw values (bytes, steps/s, samples); `balanced` sets λ_k = w_k / X_max so
    that each term weighs as its normalized share.
    """

    r_max: int
    lambdas: tuple[float, float, float]
    m_max: float
    c_max: float
    d_max: float

    @classmethod
    def balanced(cls, r_max: int, m_max: float, c_max: float, d_max: float,
                 weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> RankPolicy:
        return cls(r_max, (weights[0] / m_max, weights[1] / c_max, weights[2] / d_max), m_max, c_max, d_max)

    def __post_init__(self) -> None:
        if self.r_max < 1 or min(self.m_max, self.c_max, self.d_max) <= 0 or min(self.lambdas) < 0 or not any(self.lambdas):
            raise ValueError("RankPolicy needs r_max ≥ 1, positive normalizers and non-negative λ's, not all zero.")

    def raw_rank(self, profile: DeviceProfile) -> int:
        """The formula's r_i for this profile (before snapping to a tier)."""
        l1, l2, l3 = self.lambdas
        m = min(profile.memory_bytes, self.m_max)
        c = min(profile.compute, self.c_max)
        d = min(profile.num_samples, self.d_max)
        score = (l1 * m + l2 * c + l3 * d) / (l1 * self.m_max + l2 * self.c_max + l3 * self.d_max)
        return math.floor(self.r_max * score + 1e-9)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankPolicy:
        return cls(int(data["r_max"]), tuple(float(x) for x in data["lambdas"]), float(data["m_max"]),
                   float(data["c_max"]), float(data["d_max"]))


@dataclass(frozen=True)
class RankChoice:
    """The chosen tier and how it was reached (reported to the aggregator)."""

    rank: int
    raw_rank: int
    formula_tier: int
    memory_needed_bytes: int
    memory_available_bytes: int
    too_big: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_rank(
    profile: DeviceProfile, policy: RankPolicy, ranks: Sequence[int], measure: Callable[[int], TierProbe]
) -> RankChoice:
    """Formula → largest tier ≤ r_i (never below the smallest) → lower while its peak memory does not fit."""
    tiers = sorted(ranks)
    raw = policy.raw_rank(profile)
    start = max([r for r in tiers if r <= raw], default=tiers[0])
    too_big: list[int] = []
    for rank in reversed([r for r in tiers if r <= start]):
        needed = measure(rank).peak_rss_bytes
        if needed <= profile.memory_bytes:
            return RankChoice(rank, raw, start, needed, profile.memory_bytes, too_big)
        too_big.append(rank)
    raise InsufficientMemoryError(
        f"Training needs {needed / 2**20:.0f} MiB even at the smallest tier r={tiers[0]}, but only "
        f"{profile.memory_bytes / 2**20:.0f} MiB is available. Free memory, use a smaller batch size, or "
        f"export a smaller model."
    )
