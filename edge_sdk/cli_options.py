"""Command-line options shared by `fedpeft-client` and `fedpeft-aggregator`."""

from __future__ import annotations

from pathlib import Path

import click

from edge_sdk.protocol.transport import BrokerSettings


def broker_options(func):
    """--broker, --tls-ca, --username, --password-file (shared by the client and the aggregator)."""
    options = [
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA certificate of the broker's TLS listener (switches TLS on)."),
        click.option("--username", help="Broker username (the ACL ties topics to it)."),
        click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="File whose first line is the broker password."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def broker_settings(url: str, tls_ca: Path | None, username: str | None, password_file: Path | None) -> BrokerSettings:
    password = password_file.read_text().splitlines()[0] if password_file else None
    try:
        return BrokerSettings.from_url(url, tls_ca=tls_ca, username=username, password=password)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--broker") from err
