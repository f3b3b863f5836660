"""Portable path against onnxruntime-training on a real bundle, every tier: the gradient gap the export
recorded, and the largest loss gap over N training steps from the same start on the same batches.

Usage: .venv/bin/python benchmarks/portable_parity.py --bundle DIR [--steps 50] [--lr 0.05]
Text bundles train on Rotten Tomatoes sentences, image bundles on Fashion-MNIST classes 5–9 (the report's
transfer task); batch 16, 2 threads.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from edge_sdk.data import Example
from edge_sdk.datasets import fashion_mnist, rotten_tomatoes
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--lr", type=float, default=None, help="[default: 0.05 for an SGD bundle, 1e-3 for AdamW]")
def main(bundle: Path, steps: int, lr: float | None) -> None:
    manifest = read_manifest(bundle)
    lr = lr if lr is not None else 0.05 if manifest.lora.optimizer == "sgd" else 1e-3
    if manifest.task == "img-cls":
        data = [Example(e.x, e.label - 5) for e in fashion_mnist("train") if e.label >= 5][: 16 * steps]
    else:
        data = rotten_tomatoes()[: 16 * steps]
    click.echo(f"{bundle} ({manifest.lora.optimizer}, lr {lr:g}, {steps} steps of 16)")
    click.echo(f"{'rank':>4} {'gradient rel. gap':>18} {'max |loss gap|':>15} {'first loss':>10} {'last loss':>10}")
    for tier in manifest.tiers:
        losses = {}
        for backend in ("ort-training", "portable"):
            trainer = Trainer(bundle, tier.rank, threads=2, backend=backend)
            losses[backend] = np.array(trainer.fit(data, steps=steps, batch_size=16, lr=lr, seed=0).losses)
        gap = float(np.abs(losses["ort-training"] - losses["portable"]).max())
        click.echo(f"{tier.rank:>4} {tier.portable_max_rel_diff:>18.2e} {gap:>15.2e} "
                   f"{losses['portable'][0]:>10.4f} {losses['portable'][-1]:>10.4f}")


if __name__ == "__main__":
    main()
