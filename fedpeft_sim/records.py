"""The report's run records: each finished run's summary.json and metrics.jsonl, kept beside the report.

A simulation's folder holds checkpoints, globals and logs (hundreds of MB) and lives under `runs/`,
which is not versioned. Its two small result files, with the provenance of the code that made them, are
copied to the records folder (`docs/results/runs/<run name>/` for the full report), so a grid that takes many hours can be filled by
several invocations on different machines and every figure of the report stays traceable to a run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from edge_sdk.files import write_atomic
from fedpeft_sim.simulation import SimConfig, config_record

RUN_FILES = ("summary.json", "metrics.jsonl")
PROVENANCE = "provenance.json"
PLACE_FIELDS = ("out", "bundle", "trainer_cores", "broker_url")
"""Config fields that say where and how fast a run ran, not what it measured: ignored when matching a record.
(The report's bundle is always its own export with fixed arguments; `trainer_cores` changes the run only
within onnxruntime's dropout-seed reproducibility of ~1e-4.)"""


def keep(run: Path, records: Path) -> Path:
    """Copy the finished run folder `run`'s result files to `records/<run name>/` (atomically), with the
    provenance of the code that made it; returns the record."""
    target = records / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        write_atomic(target / name, (run / name).read_bytes())
    write_atomic(target / PROVENANCE, (json.dumps(provenance(), indent=1) + "\n").encode())
    return target


def provenance() -> dict:
    """The commit of the code running now (and whether its tree has changes), the machine and the time: what a
    config cannot say about a run (constants such as the norm cap live in the code)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified": None if status is None else bool(status),
            "machine": platform.machine(), "cores": os.cpu_count(),
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def matches(record: Path, config: SimConfig) -> bool:
    """Whether `record` holds a finished run of `config`.

    A field added to SimConfig (or to its nested configs) since the run was recorded counts at its
    default; a field removed since counts only if it was unset (None). `PLACE_FIELDS` are ignored.
    """
    if not all((record / name).is_file() for name in RUN_FILES):
        return False
    recorded = _what(json.loads((record / "summary.json").read_text())["config"])
    current = _what(json.loads(json.dumps(config_record(config))))
    defaults = _what(json.loads(json.dumps(config_record(SimConfig(bundle=config.bundle, out=config.out)))))
    return upgraded(recorded, current, defaults) == current


def load(record: Path) -> tuple[dict, list[dict]]:
    """(summary, per-round metrics rows) of a record."""
    summary = json.loads((record / "summary.json").read_text())
    rows = [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rows


def upgraded(recorded: dict, current: dict, defaults: dict) -> dict | None:
    """`recorded` with the fields of `current` it lacks at their defaults; None if it holds a set field
    that `current` no longer has."""
    if any(recorded[k] is not None for k in recorded.keys() - current.keys()):
        return None
    out = {}
    for key, value in current.items():
        if key not in recorded:
            out[key] = defaults.get(key)
        elif isinstance(value, dict) and isinstance(recorded[key], dict) and isinstance(defaults.get(key), dict):
            out[key] = upgraded(recorded[key], value, defaults[key])
        else:
            out[key] = recorded[key]
    return out


def _what(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PLACE_FIELDS}
