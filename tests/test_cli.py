"""Every tool's command line: -h, --version, and known failures as one line with a non-zero exit code."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from aggregator.cli import main as aggregator_cli
from edge_sdk.client_cli import main as client_cli
from export.cli import main as export_cli
from fedpeft_sim.cli import main as sim_cli

TOOLS = {"fedpeft-export": export_cli, "fedpeft-aggregator": aggregator_cli, "fedpeft-client": client_cli,
         "fedpeft-sim": sim_cli}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_takes_h_and_version(name: str) -> None:
    runner = CliRunner()
    assert runner.invoke(TOOLS[name], ["-h"], prog_name=name).exit_code == 0
    shown = runner.invoke(TOOLS[name], ["--version"], prog_name=name)
    assert shown.exit_code == 0 and shown.output.strip() == f"{name} {version('fedpeft')}"


def _one_line_error(result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and all(f in error[0] for f in fragments), result.output


def test_a_folder_that_is_not_a_bundle_is_one_line_for_the_aggregator_and_the_client(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    runner = CliRunner()
    _one_line_error(runner.invoke(aggregator_cli, ["--bundle", str(folder), "--federation", "f", "--rounds", "1",
                                                   "--state-dir", str(tmp_path / "state")]),
                    1, "is not a bundle", "fedpeft-export")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    _one_line_error(runner.invoke(client_cli, ["--bundle", str(folder), "--broker", "mqtt://127.0.0.1:1",
                                               "--federation", "f", "--data", str(data)]),
                    1, "is not a bundle")


def test_client_data_errors_say_what_the_file_must_hold_and_debug_shows_the_traceback(minilm_bundle: Path,
                                                                                      tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--bundle", str(minilm_bundle), "--broker", "mqtt://127.0.0.1:1", "--federation", "f"]
    _one_line_error(runner.invoke(client_cli, [*base, "--data", "imdb"]), 2, "'imdb' is neither", "JSON-lines")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\nnot json\n')
    _one_line_error(runner.invoke(client_cli, [*base, "--data", str(bad)]), 1, f"{bad}:2", '"label"')
    debug = runner.invoke(client_cli, [*base, "--data", str(bad), "--debug"])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "DataError"


def test_a_client_whose_labels_the_bundle_cannot_hold_refuses_before_it_connects(minilm_bundle, tmp_path) -> None:
    data = tmp_path / "five.jsonl"
    data.write_text('{"text": "a fine film", "label": 1}\n{"text": "a dull film", "label": 5}\n')
    result = CliRunner().invoke(client_cli, ["--bundle", str(minilm_bundle), "--broker", "mqtt://127.0.0.1:1",
                                             "--federation", "f", "--data", str(data), "--eval-fraction", "0"])
    _one_line_error(result, 1, "labels [5] outside the bundle's 2 classes", "--num-labels 6")


def test_a_refused_broker_connection_says_so_within_the_connect_timeout(minilm_bundle, tmp_path) -> None:
    import time

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a fine film", "label": 1}\n{"text": "a dull film", "label": 0}\n')
    started = time.monotonic()
    result = CliRunner().invoke(client_cli, ["--bundle", str(minilm_bundle), "--broker", "mqtt://127.0.0.1:1",
                                             "--federation", "f", "--data", str(data), "--eval-fraction", "0",
                                             "--connect-timeout", "2", "--state-dir", str(tmp_path / "c")])
    _one_line_error(result, 1, "within 2 s", "connection refused, nothing listens on port 1")
    assert time.monotonic() - started < 30
    assert "INFO" in result.output and "broker unreachable" in result.output, "--log-level INFO reaches the user"


def test_the_simulator_refuses_an_unknown_strategy_or_data_set_before_any_export(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["run", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "run")]
    _one_line_error(runner.invoke(sim_cli, [*base, "--strategy", "nope"]), 2, "'nope' is not one of")
    _one_line_error(runner.invoke(sim_cli, [*base, "--data", "imdb"]), 2, "'imdb' is neither", ".jsonl or .csv")
    assert list(tmp_path.iterdir()) == [], "nothing was exported or written"


def test_export_refuses_class_names_that_disagree_with_the_head_before_loading_the_model(tmp_path: Path) -> None:
    runner = CliRunner()
    out = ["--out", str(tmp_path / "bundle")]
    _one_line_error(runner.invoke(export_cli, [*out, "--labels", "neg,pos", "--num-labels", "3"]),
                    1, "--labels names 2 classes but --num-labels is 3")
    _one_line_error(runner.invoke(export_cli, [*out, "--labels", "neg,neg"]), 1, "distinct non-empty names")
    _one_line_error(runner.invoke(export_cli, [*out, "--labels", "neg,"]), 2, "comma-separated class names")
    assert list(tmp_path.iterdir()) == [], "nothing was exported"
