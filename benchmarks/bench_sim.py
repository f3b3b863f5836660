"""Simulation speed: rounds per minute of `fedpeft-sim run` and where a round's time goes.

Usage: .venv/bin/python benchmarks/bench_sim.py --bundle runs/bundle-sgd [--rounds 12] [--steps 5]
100 clients, 10% sampled per round, per-client Dirichlet α=0.1, mixed tiers, the real SDK clients,
aggregator and broker (mosquitto where installed). The central evaluation runs once, after the
last round, and is left out: the figures are the rounds' own wall time. The baseline measured in
the same run is the clients' training compute (the sum of their `fit` wall times in each round):
the ratio says how much of a round is anything else (tier reopen, download, upload, merge).
The first round (profiling still warms caches) and the last (final evaluation) are excluded.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import click

from aggregator.server_state import ServerOptimizer
from edge_sdk.protocol import TrainingConfig
from fedpeft_sim.simulation import SimConfig, run_simulation


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rounds", type=click.IntRange(min=4), default=12, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Local steps per client.")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--strategy", default="svd-weighted", show_default=True)
@click.option("--target-rounds", type=int, default=300, show_default=True, help="The run length to project.")
def main(bundle: Path, rounds: int, steps: int, lr: float, strategy: str, target_rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as folder:
        config = SimConfig(
            bundle=bundle, out=Path(folder) / "run", strategy=strategy, clients=100, fraction=0.1, rounds=rounds,
            alpha=0.1, size_skew=0.5, training=TrainingConfig(steps=steps, lr=lr, schedule="constant"),
            server_optimizer=ServerOptimizer("adam", lr=1e-3), eval_every=rounds, local_eval_every=rounds,
            eval_samples=100,
        )
        run_simulation(config)
        rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if 1 < r["round"] < rounds]
    wall = [r["round_seconds"] for r in timed]
    train = [r["client_train_seconds_mean"] * r["participants"] for r in timed]
    merge = [r["merge_seconds"] for r in timed]
    per_round = statistics.median(wall)
    print(f"{len(timed)} timed rounds, 100 clients, 10 per round, {steps} local steps, {strategy} + server Adam:")
    print(f"  round wall time            {per_round:7.2f} s (median)   {60 / per_round:5.2f} rounds/min")
    print(f"  clients' training compute  {statistics.median(train):7.2f} s (median)   "
          f"ratio round / training {statistics.median(w / t for w, t in zip(wall, train)):.2f}")
    print(f"  merge + server step        {statistics.median(merge):7.2f} s (median)")
    print(f"  projected {target_rounds}-round run   {target_rounds * per_round / 60:7.1f} min (without evaluation)")


if __name__ == "__main__":
    main()
