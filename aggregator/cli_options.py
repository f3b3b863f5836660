"""Command-line options of the server optimizer and the head, shared by `fedpeft-aggregator` and `fedpeft-sim run`."""

from __future__ import annotations

from typing import get_args

import click

from aggregator.server_state import OptimizerName, ServerOptimizer


def server_optimizer_options(func):
    """--server-opt, --server-lr, --server-head-lr, --server-beta1, --server-beta2, --server-eps."""
    options = [
        click.option("--server-opt", type=click.Choice(["none", *get_args(OptimizerName)]), default="none",
                     show_default=True,
                     help="Server optimizer on the merged client updates (none: each merge replaces the global)."),
        click.option("--server-lr", type=float, default=1e-3, show_default=True, help="Server learning rate."),
        click.option("--server-head-lr", type=float, default=None, help="Server lr of the head [default: --server-lr]."),
        click.option("--server-beta1", type=float, default=0.9, show_default=True,
                     help="First-moment decay (adam, yogi) or momentum (sgd: FedAvgM; 0 for plain steps)."),
        click.option("--server-beta2", type=float, default=0.99, show_default=True, help="Second-moment decay."),
        click.option("--server-eps", type=float, default=1e-5, show_default=True, help="Adaptivity ε (τ)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def server_optimizer(name: str, lr: float, head_lr: float | None, beta1: float, beta2: float,
                     eps: float) -> ServerOptimizer | None:
    """The options as a ServerOptimizer (None for 'none'); a bad value is a usage error."""
    if name == "none":
        return None
    try:
        return ServerOptimizer(name, lr=lr, head_lr=head_lr, beta1=beta1, beta2=beta2, eps=eps)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--server-*") from None


def head_options(func):
    """--closed-form-head, --statistics-rounds."""
    options = [
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
