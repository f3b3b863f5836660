"""On-device causal-LM training: peak RSS and tokens/s of a LoRA tier on both SDK paths vs PyTorch eager + peft.

Usage: .venv/bin/python benchmarks/bench_lm.py --bundle DIR --model DIR [--rank 2] [--steps 6] [--repeats 3]
DIR: a causal-LM bundle and the transformers folder it was exported from (scripts/smollm2.sh, then
`fedpeft-export --task causal-lm`). Batches of 4 × 128 tokens of real text (Rotten Tomatoes sentences packed
to full length), next-token labels, SGD at the same learning rate on every side; each run is its own
process (peak RSS = its VmHWM). Prints medians and the ratios against PyTorch.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

BATCH, LENGTH, THREADS, WARMUP = 4, 128, 2, 2
SIDES = ("ort-training", "portable", "torch")


def _batches(bundle: Path, count: int) -> list[dict[str, np.ndarray]]:
    from tokenizers import Tokenizer

    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.language import next_token_labels
    from edge_sdk.protocol.manifest import read_manifest

    manifest = read_manifest(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer["file"]))
    stream = [t for e in rotten_tomatoes() for t in tokenizer.encode(e.x + "\n").ids]
    ids = np.array(stream[:count * BATCH * LENGTH], dtype=np.int64).reshape(count, BATCH, LENGTH)
    mask = np.ones((BATCH, LENGTH), dtype=np.int64)
    return [{"input_ids": b, "attention_mask": mask, "labels": next_token_labels(b, mask)} for b in ids]


def _sdk(bundle: Path, rank: int, data: list[dict[str, np.ndarray]], backend: str) -> tuple[list[float], list[float]]:
    from edge_sdk.runtime import open_training

    opened = open_training(bundle, rank, backend=backend, threads=THREADS)
    optimizer = opened.new_optimizer()
    optimizer.set_learning_rate(1e-3)
    opened.train_mode()
    times, losses = [], []
    for feeds in data:
        start = time.perf_counter()
        loss, _ = opened.run([feeds["input_ids"], feeds["attention_mask"]], feeds["labels"])
        opened.step(optimizer)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def _torch(model_dir: Path, rank: int, data: list[dict[str, np.ndarray]]) -> tuple[list[float], list[float]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, losses = [], []
    for feeds in data:
        start = time.perf_counter()
        ids = torch.from_numpy(feeds["input_ids"])
        loss = model(input_ids=ids, attention_mask=torch.from_numpy(feeds["attention_mask"]), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def worker(side: str, bundle: Path, model_dir: Path, rank: int, steps: int) -> dict:
    """One measured run in this process: tokens/s over the steps after the warm-up, peak RSS, the first loss."""
    data = _batches(bundle, steps + WARMUP)
    times, losses = _torch(model_dir, rank, data) if side == "torch" else _sdk(bundle, rank, data, side)
    from edge_sdk.memory import peak_rss_bytes

    return {"tokens_per_s": BATCH * LENGTH * steps / sum(times[WARMUP:]), "peak_rss_mb": peak_rss_bytes() / 1e6,
            "first_loss": losses[0], "torch_loaded": "torch" in sys.modules}


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rank", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=6, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--worker", "as_worker", type=click.Choice(SIDES), default=None, hidden=True)
def main(bundle: Path, model_dir: Path, rank: int, steps: int, repeats: int, as_worker: str | None) -> None:
    """Interleave the three sides, each in its own process; print medians and ratios to PyTorch."""
    if as_worker:
        click.echo(json.dumps(worker(as_worker, bundle, model_dir, rank, steps)))
        return
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(repeats):
        for side in SIDES:
            done = subprocess.run([sys.executable, __file__, "--bundle", str(bundle), "--model", str(model_dir),
                                   "--rank", str(rank), "--steps", str(steps), "--worker", side],
                                  capture_output=True, text=True, check=True)
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    click.echo(f"causal LM r={rank}, batch {BATCH} × {LENGTH} tokens, {THREADS} threads, {steps} steps after "
               f"{WARMUP} warm-up, median of {repeats} runs")
    click.echo(f"{'side':14}{'tokens/s':>10}{'peak RSS MB':>13}{'first loss':>12}")
    rows = {}
    for side in SIDES:
        runs = results[side]
        assert side == "torch" or not any(r["torch_loaded"] for r in runs)
        rows[side] = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "peak_rss_mb", "first_loss")}
        click.echo(f"{side:14}{rows[side]['tokens_per_s']:10.0f}{rows[side]['peak_rss_mb']:13.0f}"
                   f"{rows[side]['first_loss']:12.4f}")
    for side in ("ort-training", "portable"):
        click.echo(f"{side + '/torch':14}{rows[side]['tokens_per_s'] / rows['torch']['tokens_per_s']:9.2f}×"
                   f"{rows[side]['peak_rss_mb'] / rows['torch']['peak_rss_mb']:12.2f}×")
    best = min(rows[s]["peak_rss_mb"] for s in ("ort-training", "portable"))
    click.echo(f"goal: SDK peak RSS ≤ 1200 MB at batch {BATCH} × {LENGTH}: {best:.0f} MB")


if __name__ == "__main__":
    main()
