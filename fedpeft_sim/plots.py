"""The report's figures (matplotlib, PNG): accuracy per round (one run, or seeds as mean ± std) and
accuracy vs upload bytes."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

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


def accuracy_bands(runs: dict[str, list[list[dict]]], title: str, path: Path) -> Path:
    """Central accuracy vs round per label: the mean over its seeds' runs, with a ± std band, over the rounds
    every seed scored (the per-round subset, and the final split in the closing window)."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        scored = [{r["round"]: r["central_accuracy"] for r in rows if "central_accuracy" in r} for rows in seeds]
        rounds = sorted(set.intersection(*(set(s) for s in scored)))
        values = np.array([[s[t] for t in rounds] for s in scored])
        mean, std = values.mean(axis=0), values.std(axis=0)
        line, = axes.plot(rounds, mean, label=f"{label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        if len(seeds) > 1:
            axes.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2)
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


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
