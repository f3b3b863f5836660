"""Score the saved global adapters of a finished run again, threshold-free metrics included.

Runs made before a metric existed keep every round's global adapters in their state folder, so
the metric can be taken afterwards on exactly the split the run evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.state import StateDir
from edge_sdk.protocol import decode_adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer
from fedpeft_sim.simulation import load_data, subset


def rescore_run(run: Path, bundle: Path | None = None) -> list[dict]:
    """Per round (0: the untrained adapter): accuracy, macro-F1 and ROC AUC of the top tier's global,
    on what the run itself scored: the per-round subset, and the final split in the closing window."""
    summary = run / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{run} has no summary.json: rescore a run that finished.")
    config = json.loads(summary.read_text())["config"]
    _, central_test = load_data(config["data"])
    per_round = subset(central_test, config["eval_samples"] or len(central_test))
    final = subset(central_test, config.get("final_samples") or len(central_test))
    store = StateDir(run / "state")
    if not store.globals(1):
        raise FileNotFoundError(f"{run} kept no global adapters (a full-model run, or none finished): nothing to rescore.")
    bundle = bundle or Path(config["bundle"])
    trainer = Trainer(bundle, max(read_manifest(bundle).ranks))
    closing = max(config["rounds"] - config.get("final_window", 1), 0)
    rows = []
    for round_number in range(config["rounds"] + 1):
        payloads = store.globals(round_number)
        if round_number and not payloads:
            break
        trainer.load_state(None, decode_adapter(payloads[trainer.rank], trainer.manifest)[1] if payloads else None)
        report = trainer.evaluate(final if round_number > closing else per_round)
        rows.append({"round": round_number, "accuracy": report.accuracy, "macro_f1": report.macro_f1,
                     "roc_auc": report.roc_auc, "samples": report.samples})
    return rows
