"""The report records its runs, and reuses a record only when the run was made with the config it would run now."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_sdk.protocol import TrainingConfig
from fedpeft_sim import records
from fedpeft_sim.report import HEADLINE, QUICK, ceiling_bundle, records_folder, run_name, run_report
from fedpeft_sim.simulation import SimConfig, config_record


def _finished(config: SimConfig) -> bool:
    return records.matches(config.out, config)


def _record(config: SimConfig, drop: tuple[str, ...] = (), drop_training: tuple[str, ...] = ()) -> None:
    recorded = json.loads(json.dumps(config_record(config)))
    for key in drop:
        recorded.pop(key)
    for key in drop_training:
        recorded["training"].pop(key)
    config.out.mkdir(parents=True)
    (config.out / "summary.json").write_text(json.dumps({"config": recorded}))
    (config.out / "metrics.jsonl").write_text("{}\n")


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


@pytest.mark.slow
def test_the_report_records_a_real_run_reuses_its_record_and_renders_the_targets(minilm_bundle, tmp_path: Path) -> None:
    plan = replace(QUICK, clients=4, fraction=0.5, rounds=2, eval_samples=100, pool_limit=300, strategies=HEADLINE,
                   partitions=("iid",), dtypes=(), local_eval_every=2, final_window=1,
                   final_samples=300)
    docs, work = tmp_path / "docs" / "results.md", tmp_path / "work"
    ceiling = ceiling_bundle(minilm_bundle)

    def prepare(bundle: Path) -> None:
        if bundle == ceiling and not ceiling.exists():
            ceiling.symlink_to(minilm_bundle)  # the test bundle is an AdamW export already

    run_report(plan, minilm_bundle, work, docs, only=("svd-weighted_*",), prepare=prepare)
    store = records_folder(docs)
    name = run_name("svd-weighted", "iid")
    assert sorted(p.name for p in store.iterdir()) == ["centralized.json", name]
    summary, rows = records.load(store / name)
    assert summary["rounds"] == 2 and [r["round"] for r in rows] == [0, 1, 2]
    assert summary["config"]["server_optimizer"]["name"] == "adafactor"
    assert summary["config"]["server_optimizer"]["horizon"] == 2
    made_by = json.loads((store / name / "provenance.json").read_text())
    assert len(made_by["commit"]) == 40 and made_by["cores"] >= 1

    shutil.rmtree(work)
    stamp = (store / name / "metrics.jsonl").stat().st_mtime_ns
    started = time.perf_counter()
    run_report(plan, minilm_bundle, work, docs, only=("svd-weighted_*",), prepare=prepare)
    assert time.perf_counter() - started < 20, "the recorded run is reused, not retrained"
    assert (store / name / "metrics.jsonl").stat().st_mtime_ns == stamp and not (work / name).exists()

    text = docs.read_text()
    assert "**Partial: 1 of 2 runs recorded" in text
    assert f"| IID | svd-weighted | 1 | {summary['final_accuracy']:.3f} |" in text
    assert "| IID | fedavg-naive | 0 | not run |" in text
    assert "| svd-weighted at IID ≥ 0.81 (mean of 1 seeds) | " in text and "| not measured |" in text
    written = json.loads((docs.parent / "results" / "summary.json").read_text())["rotten-tomatoes"]
    assert written["partitions"]["iid"]["svd-weighted"]["per_seed"][0]["final_accuracy"] == summary["final_accuracy"]
    assert (docs.parent / "results" / "accuracy_iid.png").stat().st_size > 0


def test_a_record_matches_wherever_and_however_fast_it_ran_but_not_another_experiment(tmp_path: Path) -> None:
    config = SimConfig(bundle=Path("runs/bundle"), out=tmp_path / "run", alpha=0.1, rounds=10, trainer_cores=2)
    _record(config)
    record = records.keep(config.out, tmp_path / "records")
    moved = replace(config, bundle=Path("elsewhere/bundle"), out=tmp_path / "other", trainer_cores=None)
    assert records.matches(record, moved)
    assert not records.matches(record, replace(config, seed=1))
    assert not records.matches(tmp_path / "records" / "missing", config)
