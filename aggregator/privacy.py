"""Client-level differential privacy of dp-fedavg: its settings, its noise source, and the privacy spent.

The accountant is Google's `dp-accounting` (RDP). The aggregator samples a fixed number m of the N
clients online, without replacement, so each round is a `SampledWithoutReplacementDpEvent` under
the replace-one relation (Wang, Balle & Kasiviswanathan 2019): replacing one client's data moves
the clipped sum by up to 2·clip, so the Gaussian event's noise multiplier is noise_multiplier / 2.
The noise generator is keyed by a secret drawn once per federation and kept in the server state
(never published): a restarted aggregator draws the same noise, and nobody who knows the
federation's seed can subtract it.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np

KEY = "dp::key"
LEDGER = "dp::ledger"
"""Server-state entries: the noise key (8 × uint32) and one row (population N, sampled m, noise multiplier z)
per round, so that settings changed between restarts are accounted as they were used."""


@dataclass(frozen=True)
class DpSettings:
    """dp-fedavg's clip norm C (each client's whole update), noise multiplier z (noise std = z·C per entry of
    the sum) and δ (None: 1 / the population of the latest round)."""

    clip: float
    noise_multiplier: float
    delta: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"The DP clip norm must be a positive number, got {self.clip}.")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"The DP noise multiplier must be a number ≥ 0, got {self.noise_multiplier}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"δ must lie in (0, 1), got {self.delta}.")


def new_key() -> np.ndarray:
    """A fresh secret noise key."""
    return np.frombuffer(secrets.token_bytes(32), dtype=np.uint32).copy()


def noise_generator(key: np.ndarray, round_number: int) -> np.random.Generator:
    """The noise of round `round_number`, from the federation's secret key."""
    entropy = int.from_bytes(np.asarray(key, dtype=np.uint32).tobytes(), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(round_number,))))


@dataclass(frozen=True)
class Sampling:
    """How a round chose its clients: `sampled` of the `population` online at the first draw; `resampled`:
    more were drawn after it (the quorum was short), so the round is accounted without amplification."""

    population: int
    sampled: int
    resampled: bool = False

    def ledger_row(self, noise_multiplier: float) -> np.ndarray:
        """The round's (N, m, z) for the accountant; refuses counts that no sampling could give."""
        if not 1 <= self.sampled <= self.population:
            raise ValueError(f"A round samples between 1 and the {self.population} clients online, not {self.sampled}.")
        drawn = self.population if self.resampled else self.sampled
        return np.array([[self.population, drawn, noise_multiplier]], dtype=np.float64)


def epsilon(ledger: np.ndarray, delta: float) -> float:
    """ε spent by the rounds of `ledger` at δ (inf if any round had no noise)."""
    rows = Counter((int(n), int(m), float(z)) for n, m, z in np.asarray(ledger, dtype=np.float64).reshape(-1, 3))
    if any(z == 0 for _, _, z in rows):
        return math.inf
    import dp_accounting  # here, not at the top: it loads scipy, which federations without DP never need
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for (population, sampled, z), count in sorted(rows.items()):
        event = dp_accounting.GaussianDpEvent(z / 2)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, event), count)
    return float(accountant.get_epsilon(delta))


def require_accountant() -> None:
    """Raise ValueError, saying what to install, where the accountant library is missing."""
    try:
        import dp_accounting  # noqa: F401  (only its presence is checked here)
    except ImportError:
        raise ValueError("dp-fedavg's privacy accountant needs the package dp-accounting: "
                         "pip install 'fedpeft[privacy]'.") from None


def default_delta(ledger: np.ndarray) -> float:
    """δ = 1 / N, N the population of the latest round."""
    return 1.0 / float(np.asarray(ledger)[-1][0])
