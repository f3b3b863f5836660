"""The report's headline figures as JSON (`docs/results/summary.json`): per task × partition × row, every seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_sdk.files import write_atomic
from fedpeft_sim.simulation import TARGET_ACCURACY

RESULT_FIELDS = ("final_accuracy", "final_roc_auc", "accuracy_last10_mean", "accuracy_last10_spread", "rounds",
                 "bytes_up", f"rounds_to_{TARGET_ACCURACY}", f"bytes_up_to_{TARGET_ACCURACY}")
"""What each seed's entry carries from its run's summary (missing ones are null)."""


def run_key(name: str) -> tuple[str, str, str, int]:
    """(row, partition, dtype, seed) of a report run folder named by `report.run_name`."""
    row, partition, dtype, seed = name.rsplit("_", 3)
    return row, partition, dtype, int(seed.removeprefix("s"))


def grid_summary(results: dict[str, tuple[dict, list[dict]]]) -> dict[str, dict[str, dict]]:
    """partition → row (dtype suffixed unless float32) → seeds, each seed's figures, mean and std of the
    final accuracy and ROC AUC, and the configuration of the first seed (the others differ by seed only)."""
    grouped: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for name, (summary, _) in results.items():
        row, partition, dtype, seed = run_key(name)
        label = row if dtype == "float32" else f"{row} ({dtype})"
        grouped.setdefault((partition, label), []).append((seed, summary))
    out: dict[str, dict[str, dict]] = {}
    for (partition, label), runs in sorted(grouped.items()):
        runs.sort(key=lambda pair: pair[0])
        entry: dict = {"seeds": [seed for seed, _ in runs],
                       "per_seed": [{k: summary.get(k) for k in RESULT_FIELDS} for _, summary in runs]}
        for metric in ("final_accuracy", "final_roc_auc"):
            values = [s[metric] for _, s in runs if s.get(metric) is not None]
            entry[metric] = ({"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
                             if values else None)
        entry["config"] = runs[0][1]["config"]
        out.setdefault(partition, {})[label] = entry
    return out


def write_summary(path: Path, tasks: dict[str, tuple[dict[str, tuple[dict, list[dict]]], dict]]) -> Path:
    """Write {task: {"centralized": its ceiling, "partitions": grid_summary(results)}} for `tasks` (task →
    (results, ceiling)) to `path`, atomically."""
    body = {task: {"centralized": ceiling, "partitions": grid_summary(results)}
            for task, (results, ceiling) in tasks.items()}
    write_atomic(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    return path
