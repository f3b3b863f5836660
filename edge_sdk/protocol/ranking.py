"""What a device reports about itself and how the federation turns that into a LoRA rank.

r_i = floor(r_max · (λ1·M_i + λ2·C_i + λ3·D_i) / (λ1·M_max + λ2·C_max + λ3·D_max))
with M memory for training (bytes), C measured compute (steps/s), D local samples. Each value
is capped at its normalizer, so no device is told more than r_max. These are plain data types:
the aggregator announces the policy and reads the profile and choice without the device runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceProfile:
    """What the rank formula needs (M, C, D) plus what the aggregator is told about the device."""

    memory_bytes: int
    compute: float
    num_samples: int
    cpu_cores: int
    threads: int
    device: str
    providers: list[str]
    preset: str | None = None
    backend: str = "ort-training"
    """The training path: "ort-training" (onnxruntime-training) or "portable" (plain onnxruntime)."""


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
        finite = all(math.isfinite(x) for x in (*self.lambdas, self.m_max, self.c_max, self.d_max))
        if (self.r_max < 1 or not finite or min(self.m_max, self.c_max, self.d_max) <= 0 or min(self.lambdas) < 0
                or not any(self.lambdas)):
            raise ValueError("RankPolicy needs r_max ≥ 1, positive normalizers and non-negative λ's, not all zero.")

    def raw_rank(self, profile: DeviceProfile) -> int:
        """The formula's r_i for this profile (before snapping to a tier)."""
        l1, l2, l3 = self.lambdas
        m = min(profile.memory_bytes, self.m_max)
        c = min(profile.compute, self.c_max)
        d = min(profile.num_samples, self.d_max)
        score = (l1 * m + l2 * c + l3 * d) / (l1 * self.m_max + l2 * self.c_max + l3 * self.d_max)
        return math.floor(self.r_max * score + 1e-9)


@dataclass(frozen=True)
class RankChoice:
    """The chosen tier and how it was reached (reported to the aggregator)."""

    rank: int
    raw_rank: int
    formula_tier: int
    memory_needed_bytes: int
    memory_available_bytes: int
    too_big: list[int] = field(default_factory=list)
