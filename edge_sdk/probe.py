"""Measure one tier in a fresh process: peak memory of training it and its training steps/s.

Run as `python -m edge_sdk.probe --bundle B --rank R --batch batch.safetensors [--threads T]`;
prints one JSON line. A separate process makes the peak RSS the tier's own (interpreter,
onnxruntime, weights, activations), not whatever the calling app holds.
"""

from __future__ import annotations

import json
import time

import click
import numpy as np
from safetensors.numpy import load_file

from edge_sdk.memory import peak_rss_bytes
from edge_sdk.runtime import onnxruntime, open_training


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--rank", required=True, type=int)
@click.option("--batch", "batch_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="safetensors file with the graph inputs and 'labels'.")
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seconds", type=float, default=2.0, show_default=True, help="Time budget for the timed steps.")
@click.option("--max-steps", type=int, default=10, show_default=True)
def main(bundle: str, rank: int, batch_file: str, threads: int | None, device: str, seconds: float, max_steps: int) -> None:
    """Train `rank` on one batch repeatedly; report peak RSS and median steps/s."""
    batch = load_file(batch_file)
    opened = open_training(bundle, rank, device=device, threads=threads, verify=False)
    inputs, labels = [batch[spec.name] for spec in opened.manifest.inputs], batch["labels"].astype(np.int64)
    optimizer = opened.new_optimizer()
    opened.train_mode()
    onnxruntime().set_seed(0)
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    for step in range(max_steps + 1):
        start = time.perf_counter()
        opened.run(inputs, labels)
        opened.step(optimizer)
        if step:
            durations.append(time.perf_counter() - start)
        if step >= 2 and time.perf_counter() > deadline:
            break
    click.echo(json.dumps({
        "rank": rank, "backend": opened.backend, "peak_rss_bytes": peak_rss_bytes(), "steps_per_second": 1.0 / float(np.median(durations)),
        "steps": len(durations),
    }))


if __name__ == "__main__":
    main()
