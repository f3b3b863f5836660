"""On-device training throughput and memory: the SDK's two paths (onnxruntime-training, and the portable
graph with numpy optimizer steps) vs PyTorch eager + peft.

Usage: .venv/bin/python benchmarks/bench_train.py --bundle DIR [--steps 40] [--repeats 3] [--pad-multiple 8]
MiniLM tier r=8, batch 16, 2 threads, real Rotten Tomatoes sentences, max 64 tokens. Each run is
a separate process (peak RSS = its VmHWM); both sides train on identical batches, (a) padded to
a fixed 64 tokens and (b) padded per batch after length bucketing (optionally up to a multiple of
--pad-multiple tokens, as the SDK's trainer does). Prints medians and the ratios portable / onnxruntime-training
and SDK / PyTorch (the bundle needs portable graphs: a fedpeft-export of this version).
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

MAX_LEN = 64
BATCH = 16
THREADS = 2
RANK = 8
BACKENDS = {"sdk": "ort-training", "portable": "portable"}
SIDES = ("sdk", "portable", "torch")


def _batches(bundle: Path, padding: str, steps: int, multiple: int | None) -> list[dict[str, np.ndarray]]:
    from edge_sdk.data import batches, stratified_split
    from edge_sdk.datasets import rotten_tomatoes
    from edge_sdk.encoders import TextEncoder
    from edge_sdk.protocol.manifest import read_manifest

    encoder = TextEncoder(bundle, read_manifest(bundle), max_length=MAX_LEN, pad_to_multiple_of=multiple)
    if padding == "fixed":
        encoder.tokenizer.enable_padding(pad_id=0, length=MAX_LEN)
    train, _ = stratified_split(rotten_tomatoes(), seed=0)
    train = train[:BATCH * steps * 2]
    out = []
    for batch in batches(train, BATCH, seed=0, lengths=encoder.lengths(train) if padding == "batch" else None):
        feeds = encoder(batch)
        feeds["labels"] = np.array([e.label for e in batch], dtype=np.int64)
        out.append(feeds)
    return out[:steps]


def _sdk(bundle: Path, data: list[dict[str, np.ndarray]], warmup: int, backend: str) -> list[float]:
    from edge_sdk.runtime import open_training

    opened = open_training(bundle, RANK, backend=backend, threads=THREADS)
    optimizer = opened.new_optimizer()
    optimizer.set_learning_rate(1e-3)
    opened.train_mode()
    times = []
    for i, feeds in enumerate(data):
        start = time.perf_counter()
        opened.run([feeds["input_ids"], feeds["attention_mask"]], feeds["labels"])
        opened.step(optimizer)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _torch(bundle: Path, data: list[dict[str, np.ndarray]], warmup: int) -> list[float]:
    import torch

    from export.model import load_lora_model, resolve_model_dir

    torch.set_num_threads(THREADS)
    loaded = load_lora_model(resolve_model_dir(None), "seq-cls", RANK, 16.0, None, True, 2)
    model = loaded.peft_model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for i, feeds in enumerate(data):
        start = time.perf_counter()
        out = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                    labels=torch.from_numpy(feeds["labels"]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def worker(side: str, padding: str, bundle: Path, steps: int, multiple: int | None) -> dict:
    """One measured run in this process; returns tokens/s and peak RSS."""
    warmup = 3
    data = _batches(bundle, padding, steps + warmup, multiple)
    times = _torch(bundle, data, warmup) if side == "torch" else _sdk(bundle, data, warmup, BACKENDS[side])
    tokens = sum(int(f["attention_mask"].sum()) for f in data[warmup:])
    from edge_sdk.memory import peak_rss_bytes

    return {"tokens_per_s": tokens / sum(times), "ms_per_step": 1000 * statistics.median(times),
            "peak_rss_mib": peak_rss_bytes() / 2**20, "torch_loaded": "torch" in sys.modules}


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--steps", type=int, default=40, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--pad-multiple", type=click.IntRange(min=1), default=None,
              help="Per-batch padding up to a multiple of this many tokens (both sides).")
@click.option("--worker", "as_worker", nargs=2, type=str, default=None, hidden=True)
def main(bundle: Path, steps: int, repeats: int, pad_multiple: int | None, as_worker: tuple[str, str] | None) -> None:
    """Interleave SDK and PyTorch runs, each in its own process; print medians and ratios."""
    if as_worker:
        click.echo(json.dumps(worker(as_worker[0], as_worker[1], bundle, steps, pad_multiple)))
        return
    multiple = ["--pad-multiple", str(pad_multiple)] if pad_multiple else []
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeats):
        for padding in ("fixed", "batch"):
            for side in SIDES:
                done = subprocess.run([sys.executable, __file__, "--bundle", str(bundle), "--steps", str(steps),
                                       *multiple, "--worker", side, padding], capture_output=True, text=True, check=True)
                results.setdefault((side, padding), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    click.echo(f"MiniLM r={RANK}, batch {BATCH}, {THREADS} threads, {steps} steps, median of {repeats} runs, "
               f"per-batch padding to a multiple of {pad_multiple or 1}")
    click.echo(f"{'padding':10}{'side':8}{'tokens/s':>10}{'ms/step':>9}{'peak RSS MiB':>14}")
    rows: dict[str, dict] = {}
    for padding, label in (("fixed", "fixed 64"), ("batch", "per-batch")):
        row = rows[padding] = {}
        for side in SIDES:
            runs = results[(side, padding)]
            row[side] = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "ms_per_step", "peak_rss_mib")}
            assert side == "torch" or not any(r["torch_loaded"] for r in runs)
            click.echo(f"{label:10}{side:8}{row[side]['tokens_per_s']:10.0f}{row[side]['ms_per_step']:9.0f}"
                       f"{row[side]['peak_rss_mib']:14.0f}")
        for a, b in (("sdk", "torch"), ("portable", "sdk"), ("portable", "torch")):
            click.echo(f"{'':10}{a + '/' + b:16}{row[a]['tokens_per_s'] / row[b]['tokens_per_s']:6.2f}×"
                       f"{'':4}{row[a]['peak_rss_mib'] / row[b]['peak_rss_mib']:14.2f}×")
    sdk = rows["batch"]["sdk"]["tokens_per_s"]
    click.echo(f"goal (a) SDK per-batch vs PyTorch fixed 64:   {sdk / rows['fixed']['torch']['tokens_per_s']:.2f}× (≥ 1.5)")
    click.echo(f"goal (b) SDK vs PyTorch, same per-batch pad: {sdk / rows['batch']['torch']['tokens_per_s']:.2f}× (≥ 1.0)")
    peak = rows["batch"]["sdk"]["peak_rss_mib"]
    worst = max(r["peak_rss_mib"] for r in results[("sdk", "batch")])
    click.echo(f"goal SDK peak RSS (per-batch): median {peak:.0f} MiB = {peak * 2**20 / 1e6:.0f} MB, "
               f"worst run {worst * 2**20 / 1e6:.0f} MB (≤ 450 MB)")
    portable = rows["batch"]["portable"]
    click.echo(f"goal portable vs onnxruntime-training (per-batch): {portable['tokens_per_s'] / sdk:.2f}× tokens/s "
               f"(≥ 0.8), {portable['peak_rss_mib'] / peak:.2f}× peak RSS (≤ 1.10)")


if __name__ == "__main__":
    main()
