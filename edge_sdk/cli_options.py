"""Command-line conventions shared by every FedPEFT tool: -h, --version, --debug, one-line errors, broker options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge_sdk.protocol.manifest import BundleError
from edge_sdk.protocol.transport import BrokerSettings, BrokerUnavailableError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
"""Every command takes -h as well as --help."""

KNOWN_ERRORS: tuple[type[BaseException], ...] = (BundleError, BrokerUnavailableError, FileNotFoundError,
                                                 NotADirectoryError, IsADirectoryError, PermissionError)
"""Failures with a message that says what to do: printed as one line, not as a traceback."""


def one_line_errors(*errors: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Put under `@click.command(...)`: KNOWN_ERRORS and `errors` become one-line errors with exit code 1;
    adds --debug, which shows the traceback instead."""
    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*args: Any, debug: bool, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except (*KNOWN_ERRORS, *errors) as err:
                if debug:
                    raise
                raise click.ClickException(str(err)) from None
        return click.option("--debug", is_flag=True, help="Show the traceback of a failure instead of one line.")(run)
    return wrap


def version_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--version: the installed fedpeft's version (a fresh option per command: click keeps the program name it
    first printed in the option)."""
    return click.version_option(package_name="fedpeft", message="%(prog)s %(version)s")(func)


def tool(*errors: type[BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`one_line_errors(*errors)` and --version, for a top-level command."""
    return lambda func: version_option(one_line_errors(*errors)(func))


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
