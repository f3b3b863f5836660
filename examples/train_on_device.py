"""Train one tier of a bundle on Rotten Tomatoes the way a device does: onnxruntime only, no torch."""

from __future__ import annotations

from pathlib import Path

import click

from edge_sdk.data import stratified_split
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.trainer import Trainer


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
    trainer = Trainer(bundle, rank, threads=threads)
    train, test = stratified_split(rotten_tomatoes(), seed=seed)
    held_out = test[:eval_samples]
    before = trainer.evaluate(held_out)
    with click.progressbar(length=steps, label=f"Training tier r={rank} on device", show_pos=True) as bar:
        report = trainer.fit(train, steps=steps, batch_size=batch_size, lr=lr, schedule="linear",
                             warmup_steps=min(10, steps // 10), seed=seed, on_step=lambda step, loss: bar.update(1))
    after = trainer.evaluate(held_out)
    click.echo(f"{report.steps} steps × {batch_size} sentences in {report.wall_seconds:.1f} s "
               f"({1000 * report.wall_seconds / report.steps:.0f} ms/step, {report.tokens / report.wall_seconds:.0f} "
               f"tokens/s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB)")
    click.echo(f"{'':14}{'loss':>8}{'accuracy':>10}{'macro-F1':>10}   (held-out, {after.samples} snippets)")
    click.echo(f"{'before':14}{before.loss:8.3f}{before.accuracy:10.3f}{before.macro_f1:10.3f}")
    click.echo(f"{'after':14}{after.loss:8.3f}{after.accuracy:10.3f}{after.macro_f1:10.3f}")


if __name__ == "__main__":
    main()
