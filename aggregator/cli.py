"""`fedpeft-aggregator`: run the rounds of a federation over MQTT."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from aggregator.cli_options import (
    head_options, local_work, privacy_options, privacy_settings, server_optimizer, server_optimizer_options,
)
from aggregator.round_merge import SAMPLE_CAP, check_strategy
from aggregator.service import Aggregator, AggregatorOptions
from aggregator.state import StateError
from aggregator.strategies import DEFAULT_STRATEGY, STRATEGIES
from edge_sdk.cli_options import CONTEXT_SETTINGS, broker_options, broker_settings, tool
from edge_sdk.protocol import DTYPES, TrainingConfig
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.protocol.ranking import RankPolicy
from edge_sdk.protocol.transport import BrokerUnavailableError


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The bundle the federation trains (`fedpeft-export --out`).")
@click.option("--broker", "broker_url", default="embedded", show_default=True,
              help="mqtt://host:port, mqtts://host:port, or 'embedded' (an in-process broker on 127.0.0.1).")
@broker_options
@click.option("--embedded-port", type=int, default=1883, show_default=True, help="Port of the embedded broker.")
@click.option("--federation", required=True, help="Federation id; namespaces all topics.")
@click.option("--rounds", type=click.IntRange(min=1), required=True)
@click.option("--clients-per-round", type=click.IntRange(min=1), default=None, help="Clients sampled per round.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Share of online clients sampled per round (instead of --clients-per-round).")
@click.option("--min-clients", type=click.IntRange(min=1), default=1, show_default=True,
              help="Quorum: updates needed to close a round at its deadline.")
@click.option("--min-online", type=click.IntRange(min=1), default=None,
              help="Clients that must be online before the first round opens [default: --min-clients].")
@click.option("--round-timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="Seconds.")
@click.option("--strategy", type=click.Choice(sorted(STRATEGIES)), default=DEFAULT_STRATEGY, show_default=True,
              help="; ".join(f"{name}: {spec.summary}" for name, spec in STRATEGIES.items()) + ".")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Crash-safe state; rerun with the same directory to resume.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append one JSON line of metrics per round.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Local steps per round [default: 2 for an SGD bundle, else --epochs].")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=None, help="Local learning rate [default: 0.05 for an SGD bundle, 1e-3 for AdamW].")
@click.option("--proximal-mu", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="FedProx's μ for local training; > 0 needs a bundle exported with --proximal.")
@click.option("--logit-adjustment", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="τ of logit-adjusted local cross-entropy (logits + τ·log of each device's label frequencies).")
@head_options
@privacy_options
@click.option("--sample-cap", type=click.FloatRange(min=1), default=SAMPLE_CAP, show_default=True,
              help="A client's self-reported sample count weighs at most this many times the round's median.")
@server_optimizer_options
@click.option("--r-max", type=click.IntRange(min=1), default=None, help="r_max of the rank formula [default: largest tier].")
@click.option("--normalizers", default="4096,4.0,1000", show_default=True,
              help="M_max (MiB), C_max (steps/s), D_max (samples) of the rank formula; equal weights λ_k = 1/(3·X_max).")
@click.option("--head", type=click.Choice(["shared", "local"]), default="shared", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Client upload dtype.")
@click.option("--chunk-size", type=click.IntRange(min=1024), default=1 << 20, show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
@tool(StateError)
def main(bundle: Path, broker_url: str, tls_ca: Path | None, username: str | None, password_file: Path | None,
         embedded_port: int, federation: str, rounds: int, clients_per_round: int | None, fraction: float | None,
         min_clients: int, min_online: int | None, round_timeout: float, strategy: str, state_dir: Path,
         metrics_file: Path | None, seed: int,
         steps: int | None, epochs: int, batch_size: int, lr: float | None, proximal_mu: float, logit_adjustment: float,
         prior_calibration: bool, closed_form_head: bool, statistics_rounds: int | None, dp_clip: float | None, dp_noise: float | None,
         dp_delta: float | None,
         sample_cap: float, server_opt: str, server_lr: float, server_head_lr: float | None, server_beta1: float,
         server_beta2: float, server_eps: float, server_schedule: str,
         server_lr_floor: float,
         r_max: int | None, normalizers: str, head: str, dtype: str, chunk_size: int, log_level: str) -> None:
    """Sample online clients, collect and validate their adapters, merge, persist and publish each round."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    if clients_per_round and fraction:
        raise click.UsageError("Give --clients-per-round or --fraction, not both.")
    manifest = read_manifest(bundle)
    try:
        check_strategy(strategy, manifest)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--strategy") from err
    steps, lr = local_work(manifest.lora.optimizer, steps, lr)
    try:
        m_max, c_max, d_max = (float(x) for x in normalizers.split(","))
        policy = RankPolicy.balanced(r_max or max(manifest.ranks), m_max * 2**20, c_max, d_max)
    except ValueError as err:
        raise click.BadParameter(f"{err} (give three positive numbers, e.g. 4096,4.0,1000)",
                                 param_hint="--normalizers") from err
    options = AggregatorOptions(
        federation=federation, rounds=rounds, state_dir=state_dir, clients_per_round=clients_per_round,
        fraction=fraction, min_clients=min_clients, min_online=min_online, round_timeout=round_timeout,
        strategy=strategy, seed=seed,
        training=TrainingConfig(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                                proximal_mu=proximal_mu, logit_adjustment=logit_adjustment,
                                feature_statistics=closed_form_head, statistics_rounds=statistics_rounds,
                                prior_calibration=prior_calibration),
        rank_policy=policy, head=head, dtype=dtype,
        chunk_size=chunk_size, metrics_file=metrics_file, sample_cap=sample_cap,
        privacy=privacy_settings(strategy, dp_clip, dp_noise, dp_delta),
        server_optimizer=server_optimizer(server_opt, strategy, server_lr, server_head_lr, server_beta1, server_beta2,
                                          server_eps, server_schedule, server_lr_floor, rounds),
    )
    embedded = None
    if broker_url == "embedded":
        from aggregator.broker import EmbeddedBroker

        embedded = EmbeddedBroker(port=embedded_port).start()
        settings = embedded.settings
        click.echo(f"Embedded MQTT broker on mqtt://{settings.host}:{settings.port}")
    else:
        settings = broker_settings(broker_url, tls_ca, username, password_file)
    try:
        aggregator = Aggregator(bundle, settings, options)
        signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
        records = aggregator.run()
    except (StateError, BrokerUnavailableError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    finally:
        if embedded is not None:
            embedded.stop()
    click.echo(f"Federation {federation}: {len(records)} rounds this run; state in {state_dir}.")


if __name__ == "__main__":
    main()
