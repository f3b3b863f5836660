"""FedAvg with full fine-tuning: the accuracy baseline that LoRA federations are compared with.

Every model weight but the embedding tables trains on each device (a `fedpeft-export
--full-finetune` bundle, trained by the SDK's onnxruntime `Trainer`) and the server averages
them by sample count. It runs in one process, without the MQTT protocol, which carries adapters
only: each upload would be 43 MB for MiniLM. Bytes count the trained weights in float32; the
reference is full FedAvg of every weight, as for the LoRA runs.
Data, partition, device presets, sampling fraction, dropouts and local training follow the
`SimConfig`, as in `run_simulation`.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from aggregator.traffic import BYTES_PER_FLOAT32, full_fedavg_upload_bytes, model_parameters
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import EvalReport, Trainer
from fedpeft_sim.simulation import (
    SimClient, SimConfig, availability, energy_joules, local_summary, prepare_run, summarize,
)

log = logging.getLogger("fedpeft.sim")
STRATEGY = "full-fedavg"


def run_full_fedavg(config: SimConfig) -> dict:
    """Run `config` as full-model FedAvg on its --full-finetune bundle; writes the files `run_simulation` writes."""
    manifest = read_manifest(config.bundle)
    if not manifest.lora.full_finetune:
        raise ValueError(f"{config.bundle} is not a --full-finetune bundle; export one with fedpeft-export --full-finetune.")
    started = time.perf_counter()
    clients, central, final = prepare_run(config)
    trainer = Trainer(config.bundle, min(manifest.ranks))
    weights = trainer.state()
    model_bytes = BYTES_PER_FLOAT32 * sum(v.size for name, v in weights.items() if name in manifest.head_shapes)
    reference = model_parameters(manifest)
    rows = [_row(0, trainer.evaluate(central), 0, 0, 0.0, [])]
    training = config.training
    for round_number in range(1, config.rounds + 1):
        round_started = time.perf_counter()
        rng = np.random.default_rng([config.seed, round_number])
        sampled = rng.choice(len(clients), size=max(1, round(config.fraction * len(clients))), replace=False)
        present = [clients[i] for i in sorted(sampled) if _available(config, clients[i], round_number)]
        sums: dict[str, np.ndarray] = {}
        seconds, energy = [], 0.0
        for client in present:
            trainer.load_state(weights)
            fit = trainer.fit(client.train, epochs=training.epochs, steps=training.steps,
                              batch_size=training.batch_size, lr=training.lr, schedule=training.schedule,
                              seed=config.seed + round_number)
            seconds.append(fit.wall_seconds)
            energy += energy_joules(fit.cpu_seconds, client.preset)
            for name, value in trainer.state().items():
                sums[name] = sums.get(name, 0.0) + len(client.train) * value.astype(np.float64)
        if present:
            total = sum(len(c.train) for c in present)
            weights = {name: (value / total).astype(np.float32) for name, value in sums.items()}
        trainer.load_state(weights)
        last = round_number == config.rounds
        row = _row(round_number, trainer.evaluate(final if last else central), len(present) * model_bytes,
                   full_fedavg_upload_bytes(reference, len(present)), energy, seconds)
        row["round_seconds"] = round(time.perf_counter() - round_started, 3)
        if last or round_number % config.local_eval_every == 0:
            accuracy = {c.client_id: trainer.evaluate(c.test).accuracy for c in clients}
            row.update(local_summary(clients, accuracy, {min(manifest.ranks): row["central_accuracy"] if last
                                                         else trainer.evaluate(final).accuracy}))
        rows.append(row)
        log.info("full-fedavg round %d: central accuracy %.3f, %d participants", round_number,
                 row["central_accuracy"], len(present))
    with open(config.out / "metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    summary = summarize(config, rows, clients, time.perf_counter() - started)
    summary["ranks"] = {"all weights": len(clients)}
    (config.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _available(config: SimConfig, client: SimClient, round_number: int) -> bool:
    check = availability(config, client.client_id)
    return check is None or check(round_number)


def _row(round_number: int, evaluation: EvalReport, traffic: int, full_up: int, energy: float,
         seconds: list[float]) -> dict:
    """One metrics line; participants download and upload the trained weights (`traffic` bytes each way)."""
    return {
        "round": round_number, "strategy": STRATEGY, "central_accuracy": evaluation.accuracy,
        "central_macro_f1": evaluation.macro_f1, "central_samples": evaluation.samples,
        "bytes_up": traffic, "bytes_down": traffic, "full_fedavg_bytes": 2 * full_up,
        "full_fedavg_bytes_up": full_up, "energy_joules": round(energy, 2),
        "participants": len(seconds), "client_train_seconds_mean": float(np.mean(seconds)) if seconds else 0.0,
    }


