"""Time per round of the svd-weighted merge: factored (QR + small SVD) vs dense SVD of ΔW, in one run.

Usage: .venv/bin/python benchmarks/bench_merge.py [--repeats 5] [--llm]
Prints medians and the dense/factored ratio for each installed linalg backend (numpy, torch on
CPU or CUDA; threads as the machine gives), and the numpy/torch ratio of the factored merge.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import click
import numpy as np

from aggregator.strategies import ClientUpdate, LayerSpec, get_strategy, linalg

RANKS = (2, 4, 8, 16)


def dense_svd_of_product(p: np.ndarray, q: np.ndarray, keep: int | None = None):
    """The baseline: form ΔW = P @ Q and take its full SVD, on the merge's own backend."""
    be = linalg.default_backend()
    u, s, vt = be.xp.linalg.svd(be.asarray(p) @ be.asarray(q), full_matrices=False)
    k = s.shape[1] if keep is None else min(keep, s.shape[1])
    u, s, v = be.numpy(u[:, :, :k]), be.numpy(s[:, :k]), be.numpy(be.xp.matrix_transpose(vt)[:, :, :k])
    return [linalg.SvdFactors(u[i], s[i], v[i]) for i in range(p.shape[0])]


def available_backends() -> list[str]:
    names = ["numpy"]
    try:
        linalg.torch_backend()
        names.append("torch")
    except ImportError:
        pass
    return names


@contextmanager
def using(name: str) -> Iterator[linalg.Backend]:
    """Run the merge on backend `name` (as FEDPEFT_MERGE_BACKEND would choose it)."""
    with mock.patch.dict(os.environ, {linalg.BACKEND_ENV: name}):
        linalg.default_backend.cache_clear()
        try:
            yield linalg.default_backend()
        finally:
            linalg.default_backend.cache_clear()


def clients(n: int, layers: dict[str, LayerSpec], ranks, rng) -> list[ClientUpdate]:
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        out.append(ClientUpdate(f"c{i}", r, int(rng.integers(20, 200)), {
            name: (rng.standard_normal((r, s.in_features), dtype=np.float32) * 0.01,
                   rng.standard_normal((s.out_features, r), dtype=np.float32) * 0.01)
            for name, s in layers.items()}))
    return out


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(updates, layers, ranks, repeats, global_rank=None) -> tuple[float, float, float]:
    merge = get_strategy("svd-weighted")
    factored = merge(updates, layers, ranks, global_rank=global_rank)
    t_fact = median_seconds(lambda: merge(updates, layers, ranks, global_rank=global_rank), repeats)
    with mock.patch("aggregator.strategies.exact_merge.svd_of_product", dense_svd_of_product):
        dense = merge(updates, layers, ranks, global_rank=global_rank)
        t_dense = median_seconds(lambda: merge(updates, layers, ranks, global_rank=global_rank), repeats)
    err = max(
        np.linalg.norm(factored.global_state[n].dense() - dense.global_state[n].dense())
        / max(np.linalg.norm(dense.global_state[n].dense()), 1e-30)
        for n in layers
    )
    return t_fact, t_dense, err


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--llm", is_flag=True, help="Also the LLM shapes (4096², 8192²; 100 clients, ranks 4/8/16).")
def main(repeats: int, llm: bool) -> None:
    rng = np.random.default_rng(0)
    backends = available_backends()
    minilm = {f"layer{i}": LayerSpec(f"layer{i}", 384, 384, 16.0) for i in range(12)}
    click.echo("MiniLM shapes: 12 LoRA pairs 384×384, ranks {2,4,8,16} mixed, float32 uploads")
    click.echo(f"{'backend':>10} {'clients':>8} {'R=Σr':>6} {'factored ms':>12} {'dense ms':>10} "
               f"{'dense/factored':>15} {'rel err':>9}")
    factored: dict[tuple[str, int], float] = {}
    for n in (10, 100, 1000):
        updates = clients(n, minilm, RANKS, rng)
        total = sum(u.rank for u in updates)
        for name in backends:
            with using(name) as backend:
                t_f, t_d, err = compare(updates, minilm, RANKS, repeats)
            factored[name, n] = t_f
            click.echo(f"{backend.name:>10} {n:>8} {total:>6} {1e3 * t_f:>12.1f} {1e3 * t_d:>10.1f} "
                       f"{t_d / t_f:>15.2f} {err:>9.1e}")
    if "torch" in backends:
        click.echo("factored merge, numpy/torch: " + ", ".join(
            f"{n} clients {factored['numpy', n] / factored['torch', n]:.2f}×" for n in (10, 100, 1000)))
    if llm:
        click.echo("LLM shapes: one layer, 100 clients, ranks {4,8,16}")
        for size in (4096, 8192):
            layers = {"w": LayerSpec("w", size, size, 32.0)}
            updates = clients(100, layers, (4, 8, 16), rng)
            for name in backends:
                with using(name) as backend:
                    t_f, t_d, err = compare(updates, layers, (4, 8, 16), 1)
                click.echo(f"{backend.name:>10} {size}²: factored {1e3 * t_f:.0f} ms, dense {1e3 * t_d:.0f} ms, "
                           f"dense/factored {t_d / t_f:.1f}×, rel err {err:.1e}")


if __name__ == "__main__":
    main()
