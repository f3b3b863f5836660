"""What the aggregator records about each closed round: persisted, appended to the metrics file, announced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RoundRecord:
    """One closed round: who took part, what moved, how long it took, and what the clients reported.

    Byte counts are encoded payloads: `bytes_in` every chunk received, `bytes_accepted` the accepted
    updates, `bytes_out` the global adapters the participants download at their tiers. The
    full_fedavg figures are what the same participants would move in full-model FedAvg.
    """

    round: int
    attempts: int
    strategy: str
    sampled: list[str]
    participants: list[str]
    dropouts: list[str]
    rejected: int
    rejected_reasons: dict[str, str]
    ranks: dict[str, int]
    samples: int
    bytes_in: int
    bytes_accepted: int
    bytes_out: int
    full_fedavg_bytes: int
    full_fedavg_bytes_up: int
    merge_seconds: float
    round_seconds: float
    client_samples: dict[str, int] = field(default_factory=dict)
    """Participant → the sample count n_i its update declared."""
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Participant → the metrics its upload's header carried (training time, loss, local evaluation)."""
    close_seconds: float = 0.0
    dp_epsilon: float | None = None
    """With dp-fedavg: the ε spent by all rounds so far at `dp_delta` (None without noise, or without DP)."""
    dp_delta: float | None = None

    @classmethod
    def from_dict(cls, body: dict) -> RoundRecord:
        """The record `to_dict` wrote (its derived `clients_*` means are recomputed, not read)."""
        return cls(**{f.name: body[f.name] for f in fields(cls) if f.name in body})

    def client_means(self) -> dict[str, float]:
        """Each client metric averaged over the participants that reported it, weighted by their sample counts."""
        means: dict[str, float] = {}
        for name in sorted({k for metrics in self.client_metrics.values() for k in metrics}):
            having = [(self.client_samples[c], m[name]) for c, m in self.client_metrics.items() if name in m]
            means[name] = sum(n * v for n, v in having) / sum(n for n, _ in having)
        return means

    def to_dict(self) -> dict:
        """JSON-ready, with the client means as `clients_<metric>` beside the rest."""
        body = asdict(self)
        body.update({f"clients_{name}": value for name, value in self.client_means().items()})
        return body

    def numbers(self) -> dict[str, float]:
        """The numeric figures, as the announced RoundResult carries them."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, float | int) and not isinstance(v, bool)}
