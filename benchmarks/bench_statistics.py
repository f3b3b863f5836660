"""What the closed-form head costs a device per round: the feature-statistics pass against local training.

Usage: .venv/bin/python benchmarks/bench_statistics.py --bundle DIR [--examples 68] [--steps 2] [--repeats 7]
One process, one thread; per tier, alternating: `Trainer.feature_statistics` over EXAMPLES real
Rotten Tomatoes reviews (the α=0.1 simulation's mean local training set) and `Trainer.fit` of
STEPS batches of 16 on them (what a round trains). Prints the median seconds of each, their ratio,
and the statistics' upload size next to the tier's adapter (float32).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--examples", type=click.IntRange(min=1), default=68, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True)
def main(bundle: Path, examples: int, steps: int, repeats: int) -> None:
    from edge_sdk.data import stratified_split
    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.protocol import read_manifest
    from edge_sdk.trainer import Trainer

    manifest = read_manifest(bundle)
    width = manifest.feature_width
    if width is None:
        raise click.ClickException("This bundle has no features output; export it with this fedpeft-export.")
    train, _ = stratified_split(rotten_tomatoes(), seed=0)
    local = train[:examples]
    stats_bytes = 4 * (width * (width + 1) // 2 + width * len(manifest.labels)) + 8 * len(manifest.labels)
    click.echo(f"{examples} examples, {steps} steps of 16, 1 thread; statistics {stats_bytes / 1024:.0f} KiB")
    for rank in manifest.ranks:
        trainer = Trainer(bundle, rank, threads=1)
        pass_seconds, fit_seconds = [], []
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            trainer.feature_statistics(local)
            middle = time.perf_counter()
            trainer.fit(local, steps=steps, batch_size=16, lr=0.0, seed=repeat)
            if repeat:
                pass_seconds.append(middle - start)
                fit_seconds.append(time.perf_counter() - middle)
        adapter_bytes = 4 * sum(a.size + b.size for a, b in trainer.get_adapter().lora.values())
        stats_pass, fit = statistics.median(pass_seconds), statistics.median(fit_seconds)
        click.echo(f"r={rank:<3} statistics pass {stats_pass:.3f} s  training {fit:.3f} s  ratio {stats_pass / fit:.2f}  "
                   f"statistics / adapter bytes {stats_bytes / adapter_bytes:.2f}")


if __name__ == "__main__":
    main()
