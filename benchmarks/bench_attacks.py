"""One round under attack: how far one hostile device moves the merged global, per strategy and norm cap.

Usage: .venv/bin/python benchmarks/bench_attacks.py --bundle runs/bundle-t [--honest 9] [--caps 4,2,1.5]
(an AdamW export with a rank-8 tier: `fedpeft-export --out runs/bundle-t --ranks 2,8`).
A rank-8 global is first trained centrally (150 steps) so the round starts from a model that has
learned; `--honest` devices then train 5 local steps each on their own 160 reviews, and one more
device either does the same (the clean round) or attacks: claims 10^6 samples, sends its update
×1000, trains on flipped labels (sent as is, ×3, ×10, or claiming 10^6 samples). Prints the merged
global's accuracy on 500 held-out reviews for each strategy, norm cap and attack.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

import aggregator.strategies.exact_merge as exact_merge
import aggregator.strategies.ffa_lora as ffa_lora
import aggregator.strategies.zero_pad as zero_pad
from aggregator import bounds
from aggregator.round_merge import merge_round
from edge_sdk.data import Example, stratified_split
from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.protocol import Adapter, AdapterHeader
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer import Trainer

RANK, SHARD = 8, 160


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--honest", type=click.IntRange(min=1), default=9, show_default=True)
@click.option("--caps", default="4,2,1.5", show_default=True, help="Norm caps to compare (× the round's low median).")
@click.option("--strategies", default="svd-weighted,fedavg-naive,trimmed-mean", show_default=True)
def main(bundle: Path, honest: int, caps: str, strategies: str) -> None:
    manifest = read_manifest(bundle)
    pool, test = stratified_split(rotten_tomatoes(), test_fraction=0.2, seed=0)
    test = test[:500]
    trainer = Trainer(bundle, RANK, threads=1)
    trainer.fit(pool[3000:5400], steps=150, batch_size=16, lr=2e-3, seed=99)
    start = trainer.state()
    click.echo(f"start: accuracy {trainer.evaluate(test).accuracy:.3f} after 150 central steps")

    def local(shard: list[Example], seed: int) -> Adapter:
        trainer.load_state(start)
        trainer.reset_optimizer()
        trainer.fit(shard, steps=5, batch_size=16, lr=2e-3, seed=seed)
        return trainer.get_adapter()

    def accuracy(adapter: Adapter) -> float:
        trainer.load_state(start)
        trainer.set_adapter(adapter)
        return trainer.evaluate(test).accuracy

    def scaled(adapter: Adapter, factor: float) -> Adapter:
        return Adapter(adapter.rank, {k: (a, b * factor) for k, (a, b) in adapter.lora.items()}, adapter.head)

    shards = [pool[i * SHARD:(i + 1) * SHARD] for i in range(honest + 1)]
    devices = [local(shard, i) for i, shard in enumerate(shards[:honest])]
    mallory = local(shards[honest], honest)
    flipped = local([Example(e.x, 1 - e.label) for e in shards[honest]], honest)
    attacks = {"none (honest tenth device)": (mallory, SHARD), "claims 10^6 samples": (mallory, 10**6),
               "update ×1000": (scaled(mallory, 1000.0), SHARD), "flipped labels": (flipped, SHARD),
               "flipped ×3": (scaled(flipped, 3.0), SHARD), "flipped ×10": (scaled(flipped, 10.0), SHARD),
               "flipped, claims 10^6": (flipped, 10**6), "flipped ×10, claims 10^6": (scaled(flipped, 10.0), 10**6)}
    click.echo(f"{'cap':>4} {'strategy':<14} {'attack':<26} accuracy")
    for cap in (float(c) for c in caps.split(",")):
        clip = functools.partial(bounds.norm_clip, cap=cap)
        for module in (exact_merge, zero_pad, ffa_lora):
            module.norm_clip = clip
        for strategy in strategies.split(","):
            for name, (adapter, claim) in attacks.items():
                updates = {f"dev{i}": (AdapterHeader("f", 1, f"dev{i}", RANK, SHARD), a) for i, a in enumerate(devices)}
                updates["mallory"] = (AdapterHeader("f", 1, "mallory", RANK, claim), adapter)
                tiers, _ = merge_round(strategy, updates, manifest)
                click.echo(f"{cap:>4g} {strategy:<14} {name:<26} {accuracy(tiers[RANK]):.3f}")


if __name__ == "__main__":
    main()
