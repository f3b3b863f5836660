"""The report's figures (matplotlib, PNG): accuracy per round, accuracy vs bytes, accuracy by tier."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402


def accuracy_per_round(runs: dict[str, list[dict]], title: str, path: Path) -> Path:
    """Central accuracy vs round, one line per labelled run."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        scored = [r for r in rows if "central_accuracy" in r]
        axes.plot([r["round"] for r in scored], [r["central_accuracy"] for r in scored], marker="o", ms=3, label=label)
    axes.set(xlabel="round", ylabel="accuracy on held-out test examples", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def accuracy_per_byte(runs: dict[str, list[dict]], title: str, path: Path) -> Path:
    """Central accuracy vs cumulative upload in MB (log x), one line per labelled run; where the first run's rows
    carry `full_fedavg_bytes_up`, a dashed line marks what its devices would have uploaded in full-model FedAvg."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        sent, accuracy, total = [], [], 0
        for r in rows:
            total += r["bytes_up"]
            if "central_accuracy" in r:
                sent.append(total / 1e6)
                accuracy.append(r["central_accuracy"])
        axes.plot(sent, accuracy, marker="o", ms=3, label=label)
    first = next(iter(runs.values()), [])
    full = sum(r.get("full_fedavg_bytes_up", 0) for r in first) / 1e6
    if full > 0:
        axes.axvline(full, color="grey", linestyle="--", label=f"full-model FedAvg, same rounds: {full:,.0f} MB")
    axes.set(xscale="log", xlabel="cumulative upload, all devices (MB)", ylabel="accuracy on held-out test examples",
             title=title)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return _save(figure, path)


def accuracy_by_tier(summaries: dict[str, dict], path: Path) -> Path:
    """Final local-test accuracy per device tier, grouped bars per labelled run."""
    tiers = ("low", "mid", "high")
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(summaries))
    for i, (label, summary) in enumerate(summaries.items()):
        values = [summary["local_accuracy_by_tier"].get(t, 0.0) for t in tiers]
        axes.bar([k + i * width for k in range(len(tiers))], values, width, label=label)
    axes.set_xticks([k + width * (len(summaries) - 1) / 2 for k in range(len(tiers))], tiers)
    axes.set(ylabel="mean local test accuracy", title="Accuracy by device tier (final global at each tier)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
