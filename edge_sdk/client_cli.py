"""`fedpeft-client`: run one device of a federation from the command line."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click
import numpy as np

from edge_sdk.cli_options import CONTEXT_SETTINGS, broker_options, broker_settings, tool
from edge_sdk.client import ClientRefusedError, FederatedClient
from edge_sdk.data import stratified_split
from edge_sdk.datasets import DataError, read_data_file, rotten_tomatoes, shard
from edge_sdk.protocol.manifest import read_manifest
from edge_sdk.profile import PRESETS
from edge_sdk.protocol.transport import BrokerUnavailableError


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The federation's bundle, as the aggregator has it.")
@click.option("--broker", "broker_url", required=True, help="mqtt://host:port or mqtts://host:port.")
@broker_options
@click.option("--federation", required=True, help="Federation id (the aggregator's --federation).")
@click.option("--data", "data_spec", required=True,
              help="'rotten-tomatoes', a JSON-lines file of {\"text\": ..., \"label\": ...}, a CSV file with text "
                   "and label columns, or (image bundles) a .npz file with arrays images (N×H×W[×C]) and labels (N).")
@click.option("--shard", "shard_spec", default=None, help="Use shard I/N of the data (0-based), e.g. 2/5.")
@click.option("--eval-fraction", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Share of the local data held out for local evaluation.")
@click.option("--client-id", default=None, help="Stable device id [default: generated once and stored].")
@click.option("--profile", "preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Simulate a device tier (memory, threads, compute caps).")
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: preset or all cores].")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the client records uploaded rounds [default: ~/.cache/fedpeft/clients/<federation>].")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None, help="Leave after this many rounds.")
@click.option("--connect-timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds to keep trying the broker (and to wait for the federation's config) before giving up.")
@click.option("--log-level", default="INFO", show_default=True)
@tool(ClientRefusedError, DataError)
def main(bundle: Path, broker_url: str, tls_ca: Path | None, username: str | None, password_file: Path | None,
         federation: str, data_spec: str, shard_spec: str | None, eval_fraction: float, client_id: str | None,
         preset: str | None, threads: int | None, state_dir: Path | None, max_rounds: int | None,
         connect_timeout: float, log_level: str) -> None:
    """Join a federation, train on local data each round this device is sampled, and upload the adapter."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    if data_spec != "rotten-tomatoes" and not Path(data_spec).is_file():
        raise click.BadParameter(f"'{data_spec}' is neither 'rotten-tomatoes' nor a file: give a JSON-lines file "
                                 "with one {\"text\": ..., \"label\": ...} object per line, a CSV file with "
                                 "text and label columns, or for an image bundle a .npz of images and labels.",
                                 param_hint="--data")
    task = read_manifest(bundle).task
    examples = rotten_tomatoes() if data_spec == "rotten-tomatoes" else read_data_file(data_spec, task != "causal-lm")
    is_image = isinstance(examples[0].x, np.ndarray)
    if is_image != (task == "img-cls"):
        raise click.BadParameter(f"{data_spec} holds {'images' if is_image else 'text'}, the bundle is a "
                                 f"{task} model: give data of its kind.", param_hint="--data")
    if shard_spec:
        try:
            index, count = (int(x) for x in shard_spec.split("/"))
            examples = shard(examples, index, count)
        except ValueError as err:
            raise click.BadParameter(f"{err} (use I/N, e.g. 2/5)", param_hint="--shard") from err
    train, test = stratified_split(examples, eval_fraction) if eval_fraction else (examples, [])
    client = FederatedClient(
        bundle, broker_settings(broker_url, tls_ca, username, password_file), federation, train,
        client_id=client_id or username, eval_data=test or None, preset=preset, threads=threads, state_dir=state_dir,
    )
    signal.signal(signal.SIGTERM, lambda *_: client.stop())
    try:
        client.start(connect_timeout)
        reports = client.run(max_rounds=max_rounds)
    except (ClientRefusedError, BrokerUnavailableError, TimeoutError) as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        client.stop()
        client.close()
        raise SystemExit(130)
    click.echo(f"{client.client_id}: took part in {len(reports)} rounds at tier r={client.rank if client.rank is not None else '-'}.")


if __name__ == "__main__":
    main()
