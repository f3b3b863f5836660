"""Where a training step's time goes, per operator: the portable graph under onnxruntime's profiler, or
PyTorch eager + peft under torch.profiler, on bench_train.py's batches (MiniLM r=8, batch 16, 2 threads,
per-batch padding).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/profile_train.py --bundle DIR --side portable|torch [--steps 20]
Prints the operators with the most time and their share; the portable side counts the graph's nodes only
(the numpy optimizer step is outside it), the torch side the whole step.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Literal

import click

from benchmarks.bench_train import RANK, THREADS, _batches

WARMUP = 3


def portable(bundle: Path, steps: int) -> tuple[dict[str, float], int, float]:
    """Milliseconds per operator type over `steps` runs of the portable graph, and the runs' wall milliseconds."""
    import onnxruntime as ort

    from edge_sdk.portable import PortableTier

    data = _batches(bundle, "batch", steps + WARMUP, None)
    tier = PortableTier(bundle, RANK, threads=THREADS)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level, options.enable_profiling = THREADS, 3, True
    session = ort.InferenceSession(str(bundle / tier.tier.dir / tier.tier.portable_model), options,
                                   providers=["CPUExecutionProvider"])
    wall = 0.0
    for feeds in data:
        start = time.perf_counter()
        named = tier.named_inputs([feeds["input_ids"], feeds["attention_mask"]], feeds["labels"])
        session.run(None, {i.name: named[i.name] for i in session.get_inputs()})
        wall += (time.perf_counter() - start) * 1e3
    profile = Path(session.end_profiling())
    times: collections.Counter = collections.Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"] / 1e3
    profile.unlink()
    return dict(times), steps + WARMUP, wall


def torch_eager(bundle: Path, steps: int) -> tuple[dict[str, float], int, float]:
    """Self CPU milliseconds per aten operator over `steps` training steps after WARMUP, and their wall
    milliseconds (profiler overhead included)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from export.model import load_lora_model, resolve_model_dir

    torch.set_num_threads(THREADS)
    data = _batches(bundle, "batch", steps + WARMUP, None)
    model = load_lora_model(resolve_model_dir(None), "seq-cls", RANK, 16.0, None, True, 2).peft_model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(feeds) -> None:
        out = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                    attention_mask=torch.from_numpy(feeds["attention_mask"]), labels=torch.from_numpy(feeds["labels"]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for feeds in data[:WARMUP]:
        step(feeds)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for feeds in data[WARMUP:]:
            step(feeds)
    wall = (time.perf_counter() - start) * 1e3
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}, steps, wall


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--side", type=click.Choice(["portable", "torch"]), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=12, show_default=True)
def main(bundle: Path, side: Literal["portable", "torch"], steps: int, top: int) -> None:
    times, runs, wall = portable(bundle, steps) if side == "portable" else torch_eager(bundle, steps)
    total = sum(times.values())
    click.echo(f"{side}: {total / runs:.0f} ms of operator time and {wall / runs:.0f} ms wall per step over {runs} steps")
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        click.echo(f"{name:32} {ms / runs:8.1f} ms/step {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
