"""Errors the exporter raises for bad input; the CLI prints them without a traceback."""


class ExportError(Exception):
    """An export cannot proceed; the message says what to change."""
