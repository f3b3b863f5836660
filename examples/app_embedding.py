"""Embedding FedPEFT in an app: the app owns its data, its UI and its lifecycle; the SDK federates.

A note-taking app labels each note it keeps (here: positive/negative reviews from a JSON-lines
file the app appends to). Every round the client asks the app for the current notes, reports
training progress to the app's UI, and stops cleanly when the app closes.

    python examples/app_embedding.py --bundle runs/demo/bundle --broker mqtt://127.0.0.1:1883 \
        --federation demo --notes my-notes.jsonl
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from edge_sdk.client import FederatedClient
from edge_sdk.data import Example
from edge_sdk.datasets import read_jsonl
from edge_sdk.protocol.transport import BrokerSettings


class NotesApp:
    """Stands for the host app: where its labelled data lives and how it shows progress."""

    def __init__(self, notes: Path) -> None:
        self.notes = notes

    def examples_for_round(self, round_number: int) -> list[Example]:
        """Read the notes as they are now: the app may have added some since the last round."""
        examples = read_jsonl(self.notes)
        purpose = "device profiling" if round_number == 0 else f"round {round_number}"
        click.echo(f"[app] {purpose}: {len(examples)} notes")
        return examples

    def show_progress(self, round_number: int, step: int, loss: float) -> None:
        if step % 10 == 0:
            click.echo(f"[app] round {round_number} step {step}: loss {loss:.3f}")


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--broker", "broker_url", default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--federation", required=True)
@click.option("--notes", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--client-id", default=None, help="Stable id of this installation [default: generated once].")
def main(bundle: Path, broker_url: str, federation: str, notes: Path, client_id: str | None) -> None:
    """Take part in a federation from inside an app until it finishes or the app is closed (Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = NotesApp(notes)
    client = FederatedClient(
        bundle, BrokerSettings.from_url(broker_url), federation, data=app.examples_for_round,
        client_id=client_id, preset="low", on_progress=app.show_progress,
    )
    worker = threading.Thread(target=client.run, name="fedpeft", daemon=True)
    signal.signal(signal.SIGINT, lambda *_: client.stop())
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    click.echo(f"[app] federation left cleanly ({client.client_id}).")


if __name__ == "__main__":
    main()
