"""The device's LoRA rank: the federation's formula (`RankPolicy`), snapped to a tier, lowered until it fits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edge_sdk.profile import TierProbe
from edge_sdk.protocol.ranking import DeviceProfile, RankChoice, RankPolicy

__all__ = ["DeviceProfile", "InsufficientMemoryError", "RankChoice", "RankPolicy", "choose_rank"]


class InsufficientMemoryError(RuntimeError):
    """Even the smallest tier does not fit in the memory available for training."""


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
