"""A language-model federation of real writers, then personalization: does each user's text get likelier?

Each user (a character of a play, `fedpeft_sim.shakespeare`) is one `FederatedClient` with its own speeches,
at a tier taken in turn from the bundle's ranks; the aggregator service merges their next-token LoRA updates
over MQTT as in deployment. After the last round every user is scored on its held-out speeches (the last
`held_out` of them, in play order) four ways, each at the user's tier: the base model, the federation's
global adapter, the global personalized by `personal_steps` steps on the user's own speeches
(`FederatedClient.personalize`), and local-only training of the same bundle without a federation.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aggregator.broker import AGGREGATOR_USER, local_broker
from aggregator.service import Aggregator, AggregatorOptions
from aggregator.state import StateDir
from edge_sdk.client import FederatedClient
from edge_sdk.data import Example
from edge_sdk.files import write_atomic
from edge_sdk.language import LanguageTrainer
from edge_sdk.protocol import TrainingConfig, decode_adapter
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.runtime import Backend
from edge_sdk.trainer_pool import TrainerPool
from fedpeft_sim.shakespeare import read_archive, users
from fedpeft_sim.simulation import _guard

log = logging.getLogger("fedpeft.sim")
SETTINGS = ("base", "global", "personalized", "local_only")
"""The four models every user is scored with, in the report's column order."""


@dataclass(frozen=True)
class PersonalizationConfig:
    """One federation of `users` writers and its per-user evaluation."""

    bundle: Path
    corpus: Path
    """The `shakespeare` 0.6 source archive (scripts/shakespeare.sh)."""
    out: Path
    users: int = 24
    """How many characters take part: those with the most speeches."""
    clients_per_round: int = 8
    rounds: int = 10
    steps: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    personal_steps: int = 5
    personal_lr: float | None = None
    """Learning rate of personalization (None: `lr`)."""
    local_steps: int = 20
    """Local-only training: steps from the bundle's initial adapter on the user's own speeches, same lr."""
    held_out: float = 0.2
    max_eval_texts: int = 24
    curve_texts: int = 4
    """Held-out speeches per user in the pooled set each round's global is scored on (the learning curve)."""
    strategy: str = "svd-weighted"
    seed: int = 0
    threads: int = 2
    backend: Backend = "auto"
    """The devices' training path; "portable" swaps adapters without reopening a session (AdamW state is numpy)."""
    sample_users: int = 2
    """Users whose generations (same prompt, base / global / personalized) go into the summary."""
    sample_tokens: int = 24
    reuse: bool = False
    """Keep the run folder's finished federation (its state) and only score again."""


@dataclass
class User:
    """A writer: its speeches to train on, its held-out speeches, and once joined its tier."""

    name: str
    client_id: str
    train: list[str]
    test: list[str]
    rank: int = 0


def load_users(config: PersonalizationConfig) -> list[User]:
    """The `config.users` characters with the most speeches, each split in play order into train and held-out."""
    by_user = users(read_archive(config.corpus))
    if len(by_user) < config.users:
        raise ValueError(f"The corpus has {len(by_user)} characters with enough speeches; ask for at most that many.")
    chosen = sorted(sorted(by_user, key=lambda u: (-len(by_user[u]), u))[: config.users])
    ranks = sorted(read_manifest(config.bundle).ranks)
    out = []
    for index, name in enumerate(chosen):
        lines = by_user[name]
        cut = len(lines) - max(1, round(config.held_out * len(lines)))
        out.append(User(name, f"u{index:03d}", lines[:cut], lines[cut:][: config.max_eval_texts],
                        ranks[index % len(ranks)]))
    return out


def curve(config: PersonalizationConfig, pool: TrainerPool, texts: list[str]) -> list[dict]:
    """Per round (0: the base model), the stored global's perplexity at the top tier on `texts`."""
    manifest, store = read_manifest(config.bundle), StateDir(config.out / "state")
    top, rows = max(manifest.ranks), []
    with pool.lease(top, config.threads) as lm:
        for number in range(config.rounds + 1):
            lm.load_state(None, decode_adapter(store.globals(number)[top], manifest)[1] if number else None)
            rows.append({"round": number, "pooled_perplexity": lm.perplexity(texts).perplexity})
            log.info("round %d: pooled held-out perplexity %.2f at r=%d", number, rows[-1]["pooled_perplexity"], top)
    return rows


def run_personalization(config: PersonalizationConfig) -> dict:
    """Run the federation and the per-user evaluation; writes summary.json (and the state) under `config.out`."""
    started = time.perf_counter()
    if read_manifest(config.bundle).task != "causal-lm":
        raise ValueError(f"{config.bundle} is not a causal-LM bundle: export one with fedpeft-export --task causal-lm.")
    if config.reuse:
        if not (config.out / "state").is_dir():
            raise ValueError(f"{config.out} holds no federation to reuse: run without --reuse first.")
    elif config.out.exists():
        shutil.rmtree(config.out)
    config.out.mkdir(parents=True, exist_ok=True)
    people = load_users(config)
    pool = TrainerPool(config.bundle, cores=config.threads, backend=config.backend)
    devices = _federate(config, people, pool)
    results = [_score(config, pool, user, device) for user, device in zip(people, devices)]
    samples = [_samples(config, pool, user, device) for user, device in
               zip(people[: config.sample_users], devices[: config.sample_users])]
    rounds = curve(config, pool, [t for u in people for t in u.test[: config.curve_texts]])
    summary = summarize(config, people, results, samples, rounds)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(config.out / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _federate(config: PersonalizationConfig, people: list[User], pool: TrainerPool) -> list[FederatedClient]:
    """The aggregator service and one SDK client per user on a loopback broker, run to the last round (a
    finished federation in the run folder is resumed: its devices only receive the final globals)."""
    broker = local_broker(config.out / "broker", [u.client_id for u in people]).start()
    federation = f"lm{config.seed}-{zlib.crc32(str(config.out).encode()):08x}"
    options = AggregatorOptions(
        federation=federation, rounds=config.rounds, state_dir=config.out / "state",
        clients_per_round=config.clients_per_round, min_online=len(people), round_timeout=1800.0,
        strategy=config.strategy, seed=config.seed,
        training=TrainingConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, schedule="constant"),
    )
    aggregator = Aggregator(config.bundle, broker.login(AGGREGATOR_USER), options)
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_guard(aggregator.run, failures), name="aggregator", daemon=True)]
    threads[0].start()
    devices = []
    try:
        for user in people:
            device = FederatedClient(config.bundle, broker.login(user.client_id), federation,
                                     [Example(t, 0) for t in user.train], client_id=user.client_id,
                                     threads=config.threads, state_dir=config.out / "clients", trainers=pool,
                                     rank=user.rank)
            device.start()
            devices.append(device)
        for device in devices:
            threads.append(threading.Thread(target=_guard(device.run, failures), name=device.client_id, daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join()
    finally:
        aggregator.stop()
        for device in devices:
            device.stop()
        broker.stop()
    if failures:
        raise RuntimeError(f"the federation failed: {failures[0]!r}") from failures[0]
    return devices


def _score(config: PersonalizationConfig, pool: TrainerPool, user: User, device: FederatedClient) -> dict:
    """The user's held-out perplexity under the base, global, personalized and local-only adapters."""
    personal = device.personalize(config.personal_steps, lr=config.personal_lr, seed=config.seed)
    with pool.lease(user.rank, config.threads) as lm:
        scores = {}
        for setting, adapter in (("base", None), ("global", device.global_adapter), ("personalized", personal)):
            lm.load_state(None, adapter)
            scores[setting] = lm.perplexity(user.test).perplexity
        lm.load_state(None)
        lm.fit([Example(t, 0) for t in user.train], steps=config.local_steps, batch_size=config.batch_size,
               lr=config.lr, seed=config.seed)
        scores["local_only"] = lm.perplexity(user.test).perplexity
    log.info("%s (r=%d): %s", user.name, user.rank, ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return {"user": user.name, "rank": user.rank, "train_speeches": len(user.train),
            "test_speeches": len(user.test), **scores}


def _samples(config: PersonalizationConfig, pool: TrainerPool, user: User, device: FederatedClient) -> dict:
    """Greedy continuations of the opening words of the user's first held-out speech, by each model."""
    prompt = " ".join(user.test[0].split()[:6])
    adapters: dict[str, Adapter | None] = {"base": None, "global": device.global_adapter,
                                           "personalized": device.personal_adapter}
    out = {"user": user.name, "rank": user.rank, "prompt": prompt}
    with pool.lease(user.rank, config.threads) as lm:
        assert isinstance(lm, LanguageTrainer)
        for setting, adapter in adapters.items():
            lm.load_state(None, adapter)
            out[setting] = lm.generate(prompt, max_new_tokens=config.sample_tokens)
    return out


def summarize(config: PersonalizationConfig, people: list[User], results: list[dict], samples: list[dict],
              curve: list[dict]) -> dict:
    """Mean and worst user per model, the relative gains the issue asks about, and the per-user rows."""
    table = {s: np.array([r[s] for r in results]) for s in SETTINGS}
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "users": len(people), "ranks": sorted({u.rank for u in people}),
        "mean_perplexity": {s: float(v.mean()) for s, v in table.items()},
        "worst_perplexity": {s: float(v.max()) for s, v in table.items()},
        "global_vs_base_mean_reduction": float(np.mean(1 - table["global"] / table["base"])),
        "personalized_below_global_share": float(np.mean(table["personalized"] < table["global"])),
        "personalized_below_local_only_share": float(np.mean(table["personalized"] < table["local_only"])),
        "per_user": results, "samples": samples, "rounds": curve,
    }

