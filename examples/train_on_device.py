"""Train one tier of a bundle on Rotten Tomatoes the way a device does: onnxruntime only, no torch."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edge_sdk.bundle import open_tier
from edge_sdk.data import TextEncoder, batches, rotten_tomatoes, stratified_split
from edge_sdk.train import evaluate, train_steps


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rank", type=int, default=8, show_default=True, help="Tier to train.")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--eval-samples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(bundle: Path, rank: int, steps: int, batch_size: int, lr: float, threads: int | None,
         eval_samples: int, seed: int) -> None:
    """Short on-device LoRA training with held-out accuracy before and after."""
    opened = open_tier(bundle, rank, threads=threads)
    encode = TextEncoder(bundle, opened.manifest)
    train, test = stratified_split(rotten_tomatoes(), seed=seed)
    held_out = test[:eval_samples]
    before = evaluate(opened, encode, batches(held_out, 64))
    optimizer = opened.new_optimizer()
    optimizer.set_learning_rate(lr)
    chosen = list(batches(train, batch_size, seed=seed))[:steps]
    start = time.perf_counter()
    losses: list[float] = []
    with click.progressbar(chosen, label=f"Training tier r={rank} on device", show_pos=True) as bar:
        for batch in bar:
            losses.extend(train_steps(opened, optimizer, encode, [batch]))
    seconds = time.perf_counter() - start
    after = evaluate(opened, encode, batches(held_out, 64))
    click.echo(f"{len(losses)} steps × {batch_size} sentences in {seconds:.1f} s ({1000 * seconds / len(losses):.0f} ms/step)")
    click.echo(f"{'':14}{'loss':>8}{'accuracy':>10}   (held-out, {after.samples} snippets)")
    click.echo(f"{'before':14}{before.loss:8.3f}{before.accuracy:10.3f}")
    click.echo(f"{'after':14}{after.loss:8.3f}{after.accuracy:10.3f}")


if __name__ == "__main__":
    main()
