"""The report reuses a finished run only when the run was made with the config it would run now."""

from __future__ import annotations

import json
from pathlib import Path

from edge_sdk.protocol import TrainingConfig
from fedpeft_sim.report import _finished
from fedpeft_sim.simulation import SimConfig, config_record


def _record(config: SimConfig, drop: tuple[str, ...] = (), drop_training: tuple[str, ...] = ()) -> None:
    recorded = json.loads(json.dumps(config_record(config)))
    for key in drop:
        recorded.pop(key)
    for key in drop_training:
        recorded["training"].pop(key)
    config.out.mkdir(parents=True)
    (config.out / "summary.json").write_text(json.dumps({"config": recorded}))


def test_fields_added_since_a_run_count_at_their_defaults_nested_ones_too(tmp_path: Path) -> None:
    config = SimConfig(bundle=Path("runs/bundle"), out=tmp_path / "run", alpha=0.1, rounds=10)
    _record(config, drop=("round_timeout",), drop_training=("proximal_mu",))
    assert _finished(config)
    changed = SimConfig(bundle=config.bundle, out=config.out, alpha=0.1, rounds=10,
                        training=TrainingConfig(epochs=1, lr=2e-3, schedule="constant", proximal_mu=0.1))
    assert not _finished(changed)
    assert not _finished(SimConfig(bundle=config.bundle, out=config.out, alpha=1.0, rounds=10))


def test_a_recorded_field_the_config_no_longer_has_blocks_reuse_unless_unset(tmp_path: Path) -> None:
    config = SimConfig(bundle=Path("runs/bundle"), out=tmp_path / "run")
    _record(config)
    summary = config.out / "summary.json"
    data = json.loads(summary.read_text())
    data["config"]["retired_option"] = None
    summary.write_text(json.dumps(data))
    assert _finished(config)
    data["config"]["retired_option"] = 3
    summary.write_text(json.dumps(data))
    assert not _finished(config)
