"""The on-device Trainer: adapter exchange, optimizer reset, schedules, metrics, bucketing, peft interop, images."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.data import Example, batches, stratified_split
from edge_sdk.datasets import fashion_mnist, rotten_tomatoes
from edge_sdk.ort_training import ort
from edge_sdk.peft_format import write_peft_adapter
from edge_sdk.protocol.adapter import Adapter
from edge_sdk.trainer import Trainer, learning_rate, macro_f1, roc_auc
from edge_sdk.trainer_pool import TrainerPool
from export.cli import main as export_cli

SENTENCES = rotten_tomatoes()[:96]


def _logits(trainer: Trainer, examples: list[Example]) -> np.ndarray:
    trainer.opened.module.eval()
    feeds = trainer.encoder(examples)
    _, logits = trainer.opened.run([feeds["input_ids"], feeds["attention_mask"]], np.zeros(len(examples), np.int64))
    return logits


def _one_step(trainer: Trainer, batch: list[Example]) -> dict[str, np.ndarray]:
    ort.set_seed(7)
    trainer.fit(batch, steps=1, batch_size=len(batch), lr=1e-3, bucketing=False)
    return trainer.opened.adapter_parameters()


def test_adapter_round_trips_into_a_fresh_trainer(minilm_bundle: Path) -> None:
    trained = Trainer(minilm_bundle, 2, threads=2)
    trained.fit(SENTENCES[:64], epochs=1, batch_size=16)
    adapter = trained.get_adapter()
    assert adapter.rank == 2 and len(adapter.lora) == 12 and len(adapter.head) == 2
    fresh = Trainer(minilm_bundle, 2, threads=2)
    assert np.abs(_logits(fresh, SENTENCES[:8]) - _logits(trained, SENTENCES[:8])).max() > 1e-4
    fresh.set_adapter(adapter)
    np.testing.assert_allclose(_logits(fresh, SENTENCES[:8]), _logits(trained, SENTENCES[:8]), atol=1e-6)


def test_a_shared_trainer_serves_devices_in_turn_without_leaking_state(minilm_bundle: Path) -> None:
    pool = TrainerPool(minilm_bundle)
    with pool.lease(2, threads=2) as trainer:
        initial = trainer.state()
        trainer.fit(SENTENCES[:32], epochs=1, batch_size=16)
        first_device = trainer.state()
    with pool.lease(2, threads=2) as trainer:
        trainer.load_state(None)
        assert all(np.array_equal(trainer.state()[k], v) for k, v in initial.items())
        trainer.fit(SENTENCES[32:64], epochs=1, batch_size=16)
        trainer.load_state(first_device)
        assert all(np.array_equal(trainer.state()[k], v) for k, v in first_device.items())
        assert max(np.abs(first_device[k] - initial[k]).max() for k in initial) > 1e-5


def test_the_pool_lends_one_thread_tiers_side_by_side_and_a_whole_host_trainer_alone(minilm_bundle: Path) -> None:
    pool = TrainerPool(minilm_bundle, cores=2)
    inside: list[tuple[str, str]] = []
    lock, both_in = threading.Lock(), threading.Barrier(2, timeout=60)

    def device(rank: int, threads: int | None, name: str) -> None:
        with pool.lease(rank, threads) as trainer:
            with lock:
                inside.append(("in", name))
            if threads == 1:
                both_in.wait()
            trainer.evaluate(SENTENCES[:8])
            with lock:
                inside.append(("out", name))

    one = [threading.Thread(target=device, args=(rank, 1, f"r{rank}")) for rank in (2, 8)]
    for thread in one:
        thread.start()
    for thread in one:
        thread.join(120)
    assert not any(t.is_alive() for t in one), "two one-thread devices share two cores at once"
    whole = [threading.Thread(target=device, args=(2, None, f"all{i}")) for i in range(2)]
    for thread in whole:
        thread.start()
    for thread in whole:
        thread.join(120)
    events = inside[4:]
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"], "a trainer with every core trains alone"


def test_set_adapter_resets_the_optimizer_moments(minilm_bundle: Path) -> None:
    batch = SENTENCES[64:80]
    warm = Trainer(minilm_bundle, 2, threads=2)
    warm.fit(SENTENCES[:48], epochs=1, batch_size=16)
    adapter = warm.get_adapter()
    continued = _one_step(warm, batch)
    warm.set_adapter(adapter)
    after_reset = _one_step(warm, batch)
    fresh = Trainer(minilm_bundle, 2, threads=2)
    fresh.set_adapter(adapter)
    reference = _one_step(fresh, batch)
    assert max(np.abs(after_reset[k] - reference[k]).max() for k in reference) < 1e-6
    assert max(np.abs(continued[k] - reference[k]).max() for k in reference) > 1e-5


def test_local_head_is_neither_sent_nor_overwritten(minilm_bundle: Path) -> None:
    trainer = Trainer(minilm_bundle, 2, threads=2, head="local")
    adapter = trainer.get_adapter()
    assert adapter.head == {}
    shared = Trainer(minilm_bundle, 2, threads=2).get_adapter()
    head_before = {k: v.copy() for k, v in shared.head.items()}
    foreign = Adapter(2, adapter.lora, {k: v + 1.0 for k, v in head_before.items()})
    trainer.set_adapter(foreign)
    params = trainer.opened.adapter_parameters()
    for name, value in head_before.items():
        np.testing.assert_array_equal(params[name], value)


def test_set_adapter_rejects_wrong_shapes_and_layers(minilm_bundle: Path) -> None:
    trainer = Trainer(minilm_bundle, 8, threads=2)
    adapter = trainer.get_adapter()
    layer = next(iter(adapter.lora))
    a, b = adapter.lora[layer]
    with pytest.raises(ValueError, match="needs A"):
        trainer.set_adapter(Adapter(8, {**adapter.lora, layer: (a[:4], b)}, adapter.head))
    with pytest.raises(ValueError, match="missing"):
        trainer.set_adapter(Adapter(8, {k: v for k, v in adapter.lora.items() if k != layer}))


def test_fit_counts_steps_epochs_and_stops_on_request(minilm_bundle: Path) -> None:
    trainer = Trainer(minilm_bundle, 2, threads=2)
    report = trainer.fit(SENTENCES[:40], steps=7, batch_size=16, bucketing=False)
    assert report.steps == 7 and report.samples == 40 + 40 + 16
    assert len(report.losses) == 7 and all(math.isfinite(x) for x in report.losses)
    seen: list[int] = []
    stopped = trainer.fit(SENTENCES, epochs=3, batch_size=8, on_step=lambda s, _: seen.append(s),
                          should_stop=lambda: len(seen) >= 4)
    assert stopped.steps == 4 and seen == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside this bundle's 2 classes"):
        trainer.fit([Example("fine", 5)], steps=1)
    with pytest.raises(ValueError, match="dataset is empty"):
        trainer.evaluate([])


def test_length_bucketing_cuts_padding(minilm_bundle: Path) -> None:
    trainer = Trainer(minilm_bundle, 2, threads=2)
    plain = trainer.fit(SENTENCES, epochs=1, batch_size=8, bucketing=False)
    bucketed = trainer.fit(SENTENCES, epochs=1, batch_size=8, bucketing=True)
    assert plain.tokens == bucketed.tokens
    assert bucketed.padded_tokens < 0.8 * plain.padded_tokens, (plain.padded_tokens, bucketed.padded_tokens)
    every = [e for batch in batches(SENTENCES, 8, seed=3, lengths=trainer.encoder.lengths(SENTENCES)) for e in batch]
    assert sorted(every, key=id) == sorted(SENTENCES, key=id)


def test_learning_rate_schedules_and_macro_f1() -> None:
    assert [learning_rate(s, 10, 1.0, "constant", warmup=2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert learning_rate(2, 10, 1.0, "linear", warmup=2) == 1.0
    assert learning_rate(6, 10, 1.0, "linear", warmup=2) == pytest.approx(0.5)
    assert learning_rate(6, 10, 1.0, "cosine", warmup=2) == pytest.approx(0.5)
    assert learning_rate(10, 10, 1.0, "cosine", warmup=2) == pytest.approx(0.0)
    labels, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp0 fn1 → 0.
    assert macro_f1(labels, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=1, max_size=40))
def test_roc_auc_is_the_pairwise_win_rate_with_ties_counting_half(pairs) -> None:
    labels, scores = (np.array(column) for column in zip(*pairs))
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        assert roc_auc(labels, scores.astype(float)) is None
        return
    wins = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    assert roc_auc(labels, scores.astype(float)) == pytest.approx(wins.mean())


def _hub_cache(folder: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache at `folder` holding `model_dir` as `repo_id`, the layout an offline machine has."""
    snapshot = folder / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        if file.is_file():
            (snapshot / file.name).symlink_to(file.resolve())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    return folder


def test_peft_adapter_folder_loads_by_hub_id_from_anywhere_with_the_task_label_names(
        minilm_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """The folder names its base by hub id (no path of this machine), carries the tokenizer and the class names,
    lists each saved module once, and AutoPeftModelForSequenceClassification, run from another working directory
    on an offline hub cache, builds the base from that id and gives the device's logits under the task's names."""
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from tokenizers import Tokenizer

    from export.model import DEFAULT_MODEL_ID, resolve_model_dir

    trainer = Trainer(minilm_bundle, 8, threads=2)
    trainer.fit(SENTENCES[:64], epochs=1, batch_size=16, lr=2e-3)
    folder = write_peft_adapter(trainer.get_adapter(), trainer.manifest, tmp_path / "adapter", minilm_bundle)
    write_peft_adapter(trainer.get_adapter(), trainer.manifest, folder, minilm_bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_MODEL_ID and config["lora_alpha"] == 16.0
    assert len(config["modules_to_save"]) == len(set(config["modules_to_save"]))
    cache = _hub_cache(tmp_path / "hub", DEFAULT_MODEL_ID, resolve_model_dir(None))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = Path("..") / "adapter"
    encoded = Tokenizer.from_file(str(relative / "tokenizer.json")).encode(SENTENCES[0].x)
    assert encoded.ids[:10] == trainer.encoder(SENTENCES[:1])["input_ids"][0][:10].tolist()
    names = json.loads((relative / "labels.json").read_text())
    assert names == trainer.manifest.labels == ["rotten", "fresh"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(relative), cache_dir=str(cache), local_files_only=True,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)}).eval()
    assert model.config.id2label == {0: "rotten", 1: "fresh"} and model.config.label2id == {"rotten": 0, "fresh": 1}
    feeds = trainer.encoder(SENTENCES[:8])
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(logits - _logits(trainer, SENTENCES[:8])).max() < 1e-4


def test_image_bundle_trains_on_fashion_mnist(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    model_dir = tmp_path / "vit"
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    ViTForImageClassification(config).save_pretrained(model_dir)
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli, ["--out", str(bundle), "--model", str(model_dir), "--task", "img-cls",
                                             "--ranks", "4", "--num-labels", "10"])
    assert result.exit_code == 0, result.output
    train, test = stratified_split(fashion_mnist("test", limit=2400), test_fraction=0.25, seed=0)
    trainer = Trainer(bundle, 4, threads=2)
    before = trainer.evaluate(test)
    report = trainer.fit(train, epochs=3, batch_size=32, lr=3e-3)
    after = trainer.evaluate(test)
    assert report.tokens == 0 and report.samples == 3 * len(train)
    assert after.loss < before.loss - 0.3 and after.accuracy > 0.4, (before, after)
