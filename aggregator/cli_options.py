"""Command-line options of the server optimizer and the head, shared by `fedpeft-aggregator` and `fedpeft-sim run`."""

from __future__ import annotations

from typing import get_args

import click

from aggregator.privacy import DpSettings
from aggregator.server_state import OptimizerName, Schedule, ServerOptimizer
from aggregator.strategies import STRATEGIES


SERVER_LR_FLOOR = 0.1
"""The default cosine schedule's last-round learning rates, as a fraction of the first round's."""
LOCAL_WORK: dict[str, tuple[int | None, float]] = {"sgd": (2, 0.05), "adamw": (None, 1e-3)}
"""Default (local steps, lr) by the bundle's device optimizer: two SGD steps at 0.05 are the converged
configuration of docs/results.md; an AdamW bundle keeps one epoch at 1e-3 (None steps: --epochs)."""


def server_optimizer_options(func):
    """--server-opt, --server-lr, --server-head-lr, --server-beta1, --server-beta2, --server-eps, --server-schedule,
    --server-lr-floor."""
    options = [
        click.option("--server-opt", type=click.Choice(["auto", "none", *get_args(OptimizerName)]), default="auto",
                     show_default=True,
                     help="Server optimizer on the merged client updates: auto is the strategy's own (Adafactor for "
                          "svd-weighted, Adam for the others; tuned for hundreds of rounds), none replaces the "
                          "global by each merge (faster for a handful of rounds)."),
        click.option("--server-lr", type=float, default=1e-3, show_default=True, help="Server learning rate."),
        click.option("--server-head-lr", type=float, default=None, help="Server lr of the head [default: --server-lr]."),
        click.option("--server-beta1", type=float, default=0.9, show_default=True,
                     help="First-moment decay (adam, yogi) or momentum (sgd: FedAvgM; 0 for plain steps)."),
        click.option("--server-beta2", type=float, default=0.99, show_default=True, help="Second-moment decay."),
        click.option("--server-eps", type=float, default=1e-5, show_default=True, help="Adaptivity ε (τ)."),
        click.option("--server-schedule", type=click.Choice(get_args(Schedule)), default="cosine", show_default=True,
                     help="Server learning rates over the rounds (cosine: annealed to --server-lr-floor × them by "
                          "the last round)."),
        click.option("--server-lr-floor", type=click.FloatRange(0, 1), default=SERVER_LR_FLOOR, show_default=True,
                     help="With --server-schedule cosine: the last round's learning rates as a fraction of the first's."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def server_optimizer(name: str, strategy: str, lr: float, head_lr: float | None, beta1: float, beta2: float,
                     eps: float, schedule: Schedule, lr_floor: float, rounds: int) -> ServerOptimizer | None:
    """The options as a ServerOptimizer (None for 'none', and for 'auto' where `strategy` has no default) over
    `rounds` rounds; a bad value is a usage error."""
    if name == "auto":
        name = (STRATEGIES[strategy].server_optimizer if strategy in STRATEGIES else None) or "none"
    if name == "none":
        return None
    try:
        return ServerOptimizer(name, lr=lr, head_lr=head_lr, beta1=beta1, beta2=beta2, eps=eps, schedule=schedule,
                               horizon=rounds, lr_floor=lr_floor)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--server-*") from None


def local_work(optimizer: str, steps: int | None, lr: float | None) -> tuple[int | None, float]:
    """--steps and --lr, each defaulting to `LOCAL_WORK` for a bundle with this device optimizer; a given
    --epochs (without --steps) counts as the choice of epochs over the default steps."""
    default_steps, default_lr = LOCAL_WORK[optimizer]
    source = click.get_current_context().get_parameter_source("epochs")
    if steps is None and source is not click.core.ParameterSource.COMMANDLINE:
        steps = default_steps
    return steps, default_lr if lr is None else lr


def privacy_options(func):
    """--dp-clip, --dp-noise, --dp-delta (with --strategy dp-fedavg)."""
    options = [
        click.option("--dp-clip", type=float, default=None,
                     help="dp-fedavg: L2 norm each client's whole update (adapter and head) is clipped to."),
        click.option("--dp-noise", type=float, default=None,
                     help="dp-fedavg: noise multiplier z; the sum of clipped updates gets Gaussian noise of std z × clip."),
        click.option("--dp-delta", type=float, default=None,
                     help="dp-fedavg: δ of the reported (ε, δ) [default: 1 / the clients online]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def privacy_settings(strategy: str, clip: float | None, noise: float | None,
                     delta: float | None) -> DpSettings | None:
    """The --dp-* options as DpSettings (None for a strategy without DP); a missing or bad value is a usage error."""
    given = clip is not None or noise is not None or delta is not None
    spec = STRATEGIES.get(strategy)
    if spec is None or not spec.private:
        if given:
            raise click.BadParameter(f"--dp-* belong to --strategy dp-fedavg, not {strategy}.", param_hint="--dp-*")
        return None
    if clip is None or noise is None:
        raise click.BadParameter(f"{strategy} needs --dp-clip and --dp-noise.", param_hint="--dp-*")
    try:
        return DpSettings(clip, noise, delta)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--dp-*") from None


def head_options(func):
    """--closed-form-head, --statistics-rounds, --prior-calibration."""
    options = [
        click.option("--prior-calibration", is_flag=True,
                     help="Devices send per-class label and predicted counts of a sample of their examples; the "
                          "server offsets each tier's output bias until those match (needs --server-opt and a trained head)."),
        click.option("--closed-form-head", is_flag=True,
                     help="Solve the shared head in closed form (LDA) from feature statistics the devices send with "
                          "their updates, instead of averaging it; needs --server-opt."),
        click.option("--statistics-rounds", type=click.IntRange(min=1), default=None,
                     help="With --closed-form-head: statistics are sent and the head solved in rounds 1..N only, "
                          "then the head stays fixed [default: every round]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
