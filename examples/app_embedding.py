"""Embedding FedPEFT in an app: the app owns its data, its UI and its lifecycle; the SDK federates.

A note-taking app labels each note it keeps (here: positive/negative reviews from a JSON-lines
file the app appends to). Every round the client asks the app for the current notes, reports
training progress to the app's UI, hands the app each new global adapter (which the app then
uses to label new notes on the device, through `Predictor`), lets the app score the trained
adapter on notes it held back (the score travels to the aggregator), and stops cleanly when the
app closes.

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
from edge_sdk.datasets import read_text_file
from edge_sdk.predict import Predictor
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.protocol.transport import BrokerSettings


class NotesApp:
    """Stands for the host app: where its labelled data lives, how it shows progress, what it does with a model."""

    def __init__(self, bundle: Path, notes: Path) -> None:
        self.bundle, self.notes = bundle, notes
        self.labeller: Predictor | None = None

    def _all_notes(self) -> list[Example]:
        return read_text_file(self.notes)

    def examples_for_round(self, round_number: int) -> list[Example]:
        """The notes as they are now (the app may have added some since the last round), but every fifth,
        which the app keeps back to score the model."""
        examples = [e for i, e in enumerate(self._all_notes()) if i % 5]
        purpose = "device profiling" if round_number == 0 else f"round {round_number}"
        click.echo(f"[app] {purpose}: {len(examples)} notes to train on")
        return examples

    def show_progress(self, round_number: int, step: int, loss: float) -> None:
        if step % 10 == 0:
            click.echo(f"[app] round {round_number} step {step}: loss {loss:.3f}")

    def new_global(self, round_number: int, adapter: Adapter) -> None:
        """The federation's latest model: label the newest note with it, on the device."""
        self.labeller = Predictor(self.bundle, adapter)
        newest = self._all_notes()[-1]
        label = self.labeller.labels[self.labeller.predict([newest])[0]]
        click.echo(f"[app] global model for round {round_number}: newest note labelled {label}")

    def score(self, predictor: Predictor) -> dict[str, float]:
        """Accuracy of the just-trained adapter on the notes kept back; sent with the update."""
        kept = [e for i, e in enumerate(self._all_notes()) if i % 5 == 0]
        correct = sum(p == e.label for p, e in zip(predictor.predict(kept), kept))
        return {"kept_back_accuracy": correct / max(1, len(kept))}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--broker", "broker_url", default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--federation", required=True)
@click.option("--notes", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--client-id", default=None, help="Stable id of this installation [default: generated once].")
def main(bundle: Path, broker_url: str, federation: str, notes: Path, client_id: str | None) -> None:
    """Take part in a federation from inside an app until it finishes or the app is closed (Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    app = NotesApp(bundle, notes)
    client = FederatedClient(
        bundle, BrokerSettings.from_url(broker_url), federation, data=app.examples_for_round,
        client_id=client_id, on_progress=app.show_progress, on_global=app.new_global, evaluate=app.score,
    )
    worker = threading.Thread(target=client.run, name="fedpeft", daemon=True)
    signal.signal(signal.SIGINT, lambda *_: client.stop())
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    click.echo(f"[app] federation left cleanly ({client.client_id}).")


if __name__ == "__main__":
    main()
