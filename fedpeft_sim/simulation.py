"""One simulated federation on one machine, with every real piece in the loop.

The aggregator service, the edge SDK's `FederatedClient`s (each profiles its simulated device
and chooses its tier through the SDK), the onnxruntime trainer and the MQTT protocol over a
real broker all run as in deployment; only the devices share one process and take turns on
opened tiers (`TrainerPool`). Each round, the global adapter is evaluated on the central test
split; every `local_eval_every` rounds and at the end also on each client's own test split.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from aggregator.broker import AGGREGATOR_USER, local_broker
from aggregator.privacy import DpSettings
from aggregator.records import RoundRecord
from aggregator.server_state import ServerOptimizer
from aggregator.service import Aggregator, AggregatorOptions
from aggregator.state import StateDir
from edge_sdk.client import FederatedClient
from edge_sdk.data import Example, stratified_split
from edge_sdk.datasets import TEXT_FILE_SUFFIXES, check_labels, fashion_mnist, read_text_file, rotten_tomatoes
from edge_sdk.profile import PRESETS, profile_device
from edge_sdk.protocol import DType, TrainingConfig, decode_adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol.ranking import RankPolicy
from edge_sdk.protocol.transport import BrokerSettings
from edge_sdk.trainer import Trainer
from edge_sdk.trainer_pool import TrainerPool
from fedpeft_sim.partition import histograms, partition

log = logging.getLogger("fedpeft.sim")

# Energy estimate: E = CPU seconds on this host ÷ the preset's compute factor (the device is that
# much slower) × the power of one busy core of such a device. Assumed figures, not measurements:
# a Cortex-A53/A55 phone efficiency core ~1 W, a Cortex-A76-class core ~2 W, a laptop x86 core ~6 W.
CORE_WATTS = {"low": 1.0, "mid": 2.0, "high": 6.0}
TARGET_ACCURACY = 0.75
RankMix = Literal["policy", "round-robin"]
"""The summary reports the first round (and the upload bytes until then) at which the global reaches this."""


@dataclass(frozen=True)
class SimConfig:
    """What one simulated federation runs; `alpha` None is an IID split."""

    bundle: Path
    out: Path
    strategy: str = "svd-weighted"
    clients: int = 100
    fraction: float = 0.1
    rounds: int = 20
    alpha: float | None = None
    size_skew: float = 0.0
    tier_mix: dict[str, float] = field(default_factory=lambda: {"low": 1 / 3, "mid": 1 / 3, "high": 1 / 3})
    dropout: float = 0.0
    seed: int = 0
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=1, lr=2e-3, schedule="constant"))
    dtype: DType = "float32"
    local_test_fraction: float = 0.2
    pool_limit: int | None = None
    eval_samples: int | None = 1000
    final_samples: int | None = None
    """Central test examples scored in each round of the closing window (a fixed stratified subset; None: the whole split)."""
    local_eval_every: int = 5
    broker_url: str | None = None
    rank_policy: RankPolicy | None = None
    round_timeout: float = 900.0
    data: str = "rotten-tomatoes"
    server_optimizer: ServerOptimizer | None = None
    privacy: DpSettings | None = None
    """dp-fedavg's clip, noise and δ."""
    eval_every: int = 1
    """Score the global on the central subset every this many rounds (and after the last)."""
    final_window: int = 10
    """The last this many rounds are each scored on the final split, so the end-of-run spread is
    measured round by round on the same examples as the final accuracy."""
    rank_mix: RankMix = "policy"
    """How devices get their tiers: the rank formula over their measured profiles ("policy"; the mix then
    follows the host's load), or client i the i-th tier in turn ("round-robin": an equal, fixed mix)."""
    trainer_cores: int | None = None
    """Cores the simulated devices train on at once (None: all). onnxruntime's dropout seed is
    process-wide, so devices training side by side make a run reproducible to about 1e-4 in its
    metrics, not bit for bit; 1 trains one device at a time and reproduces a run exactly."""


DATA_SETS = ("rotten-tomatoes", "fashion-mnist-5-9")


def load_data(name: str) -> tuple[list[Example], list[Example]]:
    """(training pool, central test split) of a named data set or of a text file.

    rotten-tomatoes: a stratified 80/20 split (seed 0) of the snippets. fashion-mnist-5-9: the
    dataset's own train/test splits restricted to classes 5–9 (Sandal … Ankle boot), relabelled
    0–4: the transfer task of the image base model, which was pretrained on classes 0–4. A .jsonl
    or .csv file of text examples (`edge_sdk.datasets.read_text_file`): a stratified 80/20 split
    (seed 0), like rotten-tomatoes.
    """
    if Path(name).suffix.lower() in TEXT_FILE_SUFFIXES and name not in DATA_SETS:
        if not Path(name).is_file():
            raise FileNotFoundError(f"{name}: no such data file.")
        return stratified_split(read_text_file(name), test_fraction=0.2, seed=0)
    if name == "rotten-tomatoes":
        return stratified_split(rotten_tomatoes(), test_fraction=0.2, seed=0)
    if name == "fashion-mnist-5-9":
        train, test = ([Example(e.x, e.label - 5) for e in fashion_mnist(split) if e.label >= 5]
                       for split in ("train", "test"))
        return train, test
    raise ValueError(f"Unknown data set '{name}'; choose one of {', '.join(DATA_SETS)}, or give a "
                     f"{' or '.join(TEXT_FILE_SUFFIXES)} file.")


@dataclass
class SimClient:
    """A simulated device: its preset, its local train/test data and, once joined, its tier."""

    client_id: str
    preset: str
    train: list[Example]
    test: list[Example]
    rank: int | None = None


def split_clients(config: SimConfig, pool: list[Example]) -> tuple[list[SimClient], dict]:
    """Partition the pool, split each share into local train/test, and assign device presets by the mix."""
    labels = [e.label for e in pool]
    parts = partition(labels, config.clients, config.alpha, config.seed, config.size_skew, min_size=4)
    rng = np.random.default_rng([config.seed, 1])
    presets = assign_presets(config.tier_mix, config.clients, rng)
    clients = []
    for k, (part, preset) in enumerate(zip(parts, presets)):
        order = rng.permutation(part)
        held = max(1, round(config.local_test_fraction * len(order)))
        clients.append(SimClient(f"c{k:03d}", preset, [pool[i] for i in order[held:]], [pool[i] for i in order[:held]]))
    record = {
        "alpha": config.alpha, "size_skew": config.size_skew, "seed": config.seed,
        "clients": {c.client_id: {"preset": c.preset, "train": len(c.train), "test": len(c.test),
                                  "labels": h} for c, h in zip(clients, histograms(labels, parts, max(labels) + 1))},
    }
    return clients, record


def assign_presets(mix: dict[str, float], count: int, rng: np.random.Generator) -> list[str]:
    """`count` preset names in the proportions of `mix` (largest remainders), in a seeded order."""
    unknown = set(mix) - set(PRESETS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"Tier mix must give non-negative weights to presets {sorted(PRESETS)}, got {mix}.")
    names = sorted(mix)
    quotas = np.array([mix[n] for n in names]) / sum(mix.values()) * count
    counts = np.floor(quotas).astype(int)
    for i in np.argsort(counts - quotas)[: count - counts.sum()]:
        counts[i] += 1
    return rng.permutation([n for n, c in zip(names, counts) for _ in range(c)]).tolist()


class Evaluator:
    """Evaluates each round's global adapter (called by the aggregator before the next round opens)."""

    def __init__(self, config: SimConfig, pool: TrainerPool, central: list[Example], final: list[Example],
                 clients: list[SimClient], metrics: Path) -> None:
        self.config, self.pool, self.central, self.final, self.clients = config, pool, central, final, clients
        self.manifest = read_manifest(config.bundle)
        self.store = StateDir(config.out / "state")
        self.metrics = metrics
        self.rows: list[dict] = []

    def baseline(self) -> None:
        """Round 0: the bundle's untrained adapter at the top tier, the point every run starts from."""
        top = max(self.manifest.ranks)
        with self.pool.lease(top) as trainer:
            trainer.load_state(None)
            central = trainer.evaluate(self.central)
        self._append({"round": 0, "strategy": self.config.strategy, "central_accuracy": central.accuracy,
                      "central_macro_f1": central.macro_f1, "central_roc_auc": central.roc_auc,
                      "central_samples": central.samples, "eval_rank": top,
                      "bytes_up": 0, "bytes_down": 0, "full_fedavg_bytes": 0, "full_fedavg_bytes_up": 0,
                      "energy_joules": 0.0})

    def __call__(self, record: RoundRecord) -> None:
        round_number = record.round
        last = round_number == self.config.rounds
        closing = round_number > self.config.rounds - self.config.final_window
        local = last or round_number % self.config.local_eval_every == 0
        row = {"round": round_number, "strategy": self.config.strategy, **_traffic(record), **self._clients(record)}
        if not (closing or local or round_number % self.config.eval_every == 0):
            self._append(row)
            return
        globals_ = {rank: decode_adapter(p, self.manifest)[1] for rank, p in self.store.globals(round_number).items()}
        top = max(globals_)
        started = time.perf_counter()
        with self.pool.lease(top) as trainer:
            trainer.load_state(None, globals_[top])
            central = trainer.evaluate(self.final if closing else self.central)
        row.update({"central_accuracy": central.accuracy, "central_macro_f1": central.macro_f1,
                    "central_roc_auc": central.roc_auc, "central_samples": central.samples, "eval_rank": top})
        if local:
            row.update(self._local(globals_))
        row["eval_seconds"] = round(time.perf_counter() - started, 3)
        self._append(row)
        log.info("round %d: central accuracy %.3f (r=%d, %d samples), up %.2f MB", round_number, central.accuracy,
                 top, central.samples, row["bytes_up"] / 1e6)

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def _clients(self, record: RoundRecord) -> dict:
        """Client training time and the energy estimate, from the metrics the uploads carried."""
        presets = {c.client_id: c.preset for c in self.clients}
        train = [m["train_seconds"] for m in record.client_metrics.values()]
        energy = sum(energy_joules(m["train_cpu_seconds"], presets[cid]) for cid, m in record.client_metrics.items())
        return {"client_train_seconds_mean": float(np.mean(train)), "client_train_seconds_max": float(np.max(train)),
                "energy_joules": round(energy, 2)}

    def _local(self, globals_: dict) -> dict:
        """Each client's accuracy on its own test split with the global at its tier; by tier and by rank."""
        accuracy: dict[str, float] = {}
        by_rank: dict[int, float] = {}
        for rank in sorted({c.rank for c in self.clients} | set(globals_)):
            with self.pool.lease(rank) as trainer:
                trainer.load_state(None, globals_[rank])
                by_rank[rank] = trainer.evaluate(self.central).accuracy
                for c in self.clients:
                    if c.rank == rank:
                        accuracy[c.client_id] = trainer.evaluate(c.test).accuracy
        return local_summary(self.clients, accuracy, by_rank)


def _traffic(record: RoundRecord) -> dict:
    return {
        "participants": len(record.participants), "dropouts": len(record.dropouts),
        "ranks": sorted(record.ranks.values()), "bytes_up": record.bytes_accepted,
        "bytes_down": record.bytes_out, "full_fedavg_bytes": record.full_fedavg_bytes,
        "full_fedavg_bytes_up": record.full_fedavg_bytes_up,
        "round_seconds": record.round_seconds, "merge_seconds": record.merge_seconds,
    } | ({"dp_epsilon": record.dp_epsilon, "dp_delta": record.dp_delta} if record.dp_delta is not None else {})


def energy_joules(cpu_seconds: float, preset: str) -> float:
    """CPU seconds on this host as joules on the preset's device (see CORE_WATTS)."""
    return cpu_seconds / PRESETS[preset].compute_factor * CORE_WATTS[preset]


def local_summary(clients: list[SimClient], accuracy: dict[str, float], by_rank: dict[int, float]) -> dict:
    """Per-client local accuracies (client id → accuracy) summarized: mean, worst, 10th percentile, by preset."""
    tiers: dict[str, list[float]] = defaultdict(list)
    ranks: dict[int, list[float]] = defaultdict(list)
    for c in clients:
        tiers[c.preset].append(accuracy[c.client_id])
        ranks[c.rank].append(accuracy[c.client_id])
    values = np.array(list(accuracy.values()))
    return {
        "local_accuracy_mean": float(values.mean()), "local_accuracy_worst": float(values.min()),
        "local_accuracy_p10": float(np.percentile(values, 10)),
        "local_accuracy_by_tier": {t: float(np.mean(v)) for t, v in sorted(tiers.items())},
        "local_accuracy_by_rank": {str(r): float(np.mean(v)) for r, v in sorted(ranks.items())},
        "central_accuracy_by_rank": {str(r): a for r, a in by_rank.items()},
    }


def prepare_run(config: SimConfig) -> tuple[list[SimClient], list[Example], list[Example]]:
    """Empty the run folder, load and partition the data (saved as partition.json).

    Returns (clients, the per-round evaluation subset, the split scored after the last round).
    """
    if config.out.exists():
        shutil.rmtree(config.out)
    config.out.mkdir(parents=True)
    data, central_test = load_data(config.data)
    check_labels(data + central_test, len(read_manifest(config.bundle).labels), config.data)
    if config.pool_limit is not None:
        data = subset(data, config.pool_limit)
    clients, split = split_clients(config, data)
    (config.out / "partition.json").write_text(json.dumps(split, indent=1))
    central = central_test if config.eval_samples is None else subset(central_test, config.eval_samples)
    final = central_test if config.final_samples is None else subset(central_test, config.final_samples)
    return clients, central, final


def run_simulation(config: SimConfig, pool: TrainerPool | None = None) -> dict:
    """Run the federation of `config`; writes metrics.jsonl, partition.json and summary.json under `config.out`."""
    started = time.perf_counter()
    clients, central, final = prepare_run(config)
    pool = pool or TrainerPool(config.bundle, cores=config.trainer_cores)
    evaluator = Evaluator(config, pool, central, final, clients, config.out / "metrics.jsonl")
    evaluator.baseline()
    broker = None if config.broker_url else local_broker(config.out / "broker", [c.client_id for c in clients]).start()
    settings = broker.login(AGGREGATOR_USER) if broker else BrokerSettings.from_url(config.broker_url)
    federation = f"sim{config.seed}-{zlib.crc32(str(config.out).encode()):08x}"
    options = AggregatorOptions(
        federation=federation, rounds=config.rounds, state_dir=config.out / "state", fraction=config.fraction,
        min_online=config.clients, round_timeout=config.round_timeout, strategy=config.strategy, seed=config.seed,
        training=config.training, rank_policy=config.rank_policy or default_policy(config, clients),
        dtype=config.dtype, server_optimizer=config.server_optimizer, privacy=config.privacy,
    )
    aggregator = Aggregator(config.bundle, settings, options, on_round=evaluator)
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_guard(aggregator.run, failures), name="aggregator", daemon=True)]
    threads[0].start()
    devices = []
    try:
        tiers = sorted(read_manifest(config.bundle).ranks)
        for index, c in enumerate(clients):
            device = FederatedClient(
                config.bundle, broker.login(c.client_id) if broker else settings, federation, c.train,
                client_id=c.client_id, preset=c.preset,
                state_dir=config.out / "clients", trainers=pool, available=availability(config, c.client_id),
                rank=tiers[index % len(tiers)] if config.rank_mix == "round-robin" else None,
            )
            device.start()
            c.rank = device.rank
            devices.append(device)
        log.info("%d clients joined; tiers %s", len(devices), dict(sorted(Counter(c.rank for c in clients).items())))
        for device in devices:
            threads.append(threading.Thread(target=_guard(device.run, failures), name=device.client_id, daemon=True))
            threads[-1].start()
        threads[0].join()
        for thread in threads[1:]:
            thread.join(timeout=60)
    finally:
        aggregator.stop()
        for device in devices:
            device.stop()
        threads[0].join(timeout=30)
        for device in devices:
            device.close()
        if broker:
            broker.stop()
    if failures:
        raise RuntimeError(f"the simulation failed: {failures[0]!r}") from failures[0]
    summary = summarize(config, evaluator.rows, clients, time.perf_counter() - started)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def default_policy(config: SimConfig, clients: list[SimClient]) -> RankPolicy:
    """λ's 0.45, 0.45, 0.1 over M, C, D; M_max 4 GiB (the high preset), C_max the slowest measured compute
    among the clients of the fastest preset, D_max the median local size.

    Normalizing compute by this host's own fastest simulated devices makes the tiers follow the
    presets and the data rather than how fast or loaded the host is; with these weights the three
    presets spread over all four tiers (measured on an idle 2-core host at α=0.1, 100 clients: low 2,
    mid 4, high 8 or 16 by data size; 32/34/13/21 clients). Tiers follow measured compute, so a
    loaded host measures a different mix: every run records its mix in summary.json (`ranks`).
    """
    fastest = max({c.preset for c in clients}, key=lambda name: PRESETS[name].compute_factor)
    compute = min(profile_device(config.bundle, c.train, batch_size=config.training.batch_size, preset=c.preset)[0]
                  .compute for c in clients if c.preset == fastest)
    median = float(np.median([len(c.train) for c in clients]))
    return RankPolicy.balanced(max(read_manifest(config.bundle).ranks), 4 * 2**30, compute, max(1.0, median),
                               weights=(0.45, 0.45, 0.1))


def summarize(config: SimConfig, rows: list[dict], clients: list[SimClient], seconds: float) -> dict:
    """The run's headline figures: final accuracies, tier ratio, bytes and their ratio to full FedAvg.

    The upload ratio compares like with like: what the participants uploaded over what they would
    upload in full-model FedAvg; the total ratio adds the downloads on both sides.
    """
    last, rounds = rows[-1], [r for r in rows if r["round"] > 0]
    scored = [r for r in rounds if "central_accuracy" in r]
    reached = [r for r in scored if r["central_accuracy"] >= TARGET_ACCURACY]
    tail = np.array([r["central_accuracy"] for r in scored[-10:]])
    by_tier = last["local_accuracy_by_tier"]
    up = sum(r["bytes_up"] for r in rows)
    full, full_up = sum(r["full_fedavg_bytes"] for r in rows), sum(r["full_fedavg_bytes_up"] for r in rows)
    down = sum(r["bytes_down"] for r in rows)
    return {
        "config": config_record(config),
        "rounds": len(rounds), "initial_accuracy": rows[0]["central_accuracy"] if rows[0]["round"] == 0 else None,
        "final_accuracy": last["central_accuracy"], "final_macro_f1": last["central_macro_f1"],
        "accuracy_last3": float(np.mean([r["central_accuracy"] for r in scored[-3:]])),
        "accuracy_last10_mean": float(tail.mean()), "accuracy_last10_spread": float(tail.max() - tail.min()),
        "final_roc_auc": last.get("central_roc_auc"),
        f"rounds_to_{TARGET_ACCURACY}": reached[0]["round"] if reached else None,
        f"bytes_up_to_{TARGET_ACCURACY}": sum(r["bytes_up"] for r in rows if r["round"] <= reached[0]["round"])
        if reached else None,
        "worst_client_accuracy": last["local_accuracy_worst"], "local_accuracy_mean": last["local_accuracy_mean"],
        "low_high_ratio": by_tier["low"] / by_tier["high"] if by_tier.get("low") and by_tier.get("high") else None,
        "low_high_rank_ratio": _rank_ratio(last.get("local_accuracy_by_rank", {})),
        "central_accuracy_by_rank": last["central_accuracy_by_rank"], "local_accuracy_by_tier": by_tier,
        "bytes_up": up, "bytes_down": down, "full_fedavg_bytes": full,
        "up_ratio_to_full_fedavg": up / full_up, "total_ratio_to_full_fedavg": (up + down) / full,
        "bytes_up_per_round": up / len(rounds),
        "energy_joules": sum(r["energy_joules"] for r in rows),
        "ranks": dict(sorted(Counter(c.rank for c in clients).items())), "wall_seconds": round(seconds, 1),
    }


def _rank_ratio(by_rank: dict[str, float]) -> float | None:
    """Local accuracy of the lowest tier's clients over the highest tier's (None with one tier)."""
    if len(by_rank) < 2:
        return None
    ranks = sorted(by_rank, key=int)
    return by_rank[ranks[0]] / by_rank[ranks[-1]] if by_rank[ranks[-1]] else None


def config_record(config: SimConfig) -> dict:
    """The run's config as JSON-ready data (the rank policy is derived, so it is left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "rank_policy"}


def subset(examples: list[Example], count: int) -> list[Example]:
    """A fixed stratified subset (the same for every run), for the cheaper per-round evaluation."""
    if count >= len(examples):
        return examples
    return stratified_split(examples, test_fraction=count / len(examples), seed=1)[1]


def availability(config: SimConfig, client_id: str):
    """Seeded per (run, client, round): whether the device takes part when sampled."""
    if config.dropout <= 0:
        return None
    return lambda round_number: np.random.default_rng(
        [config.seed, zlib.crc32(client_id.encode()), round_number]).random() >= config.dropout


def _guard(target, failures: list[BaseException]):
    def run() -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            log.exception("%s failed", threading.current_thread().name)
            failures.append(err)
    return run


def centralized(bundle: Path, rank: int, epochs: int, lr: float, batch_size: int = 16, seed: int = 0,
                limit: int | None = None, data_set: str = "rotten-tomatoes") -> dict:
    """The ceiling: one device training tier `rank` on the pooled training data (same split as the runs)."""
    data, central_test = load_data(data_set)
    if limit is not None:
        data = subset(data, limit)
    trainer = Trainer(bundle, rank)
    fit = trainer.fit(data, epochs=epochs, batch_size=batch_size, lr=lr, schedule="linear", seed=seed)
    result = trainer.evaluate(central_test)
    return {"rank": rank, "epochs": epochs, "lr": lr, "accuracy": result.accuracy, "macro_f1": result.macro_f1,
            "train_seconds": round(fit.wall_seconds, 1), "samples": len(data)}
