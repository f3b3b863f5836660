"""Causal language models on the device: next-token training, perplexity and generation, onnxruntime only.

A causal-LM bundle's graphs score every position of a batch (logits flattened to tokens × vocabulary) against
one label per position; this module turns texts into those labels (each position learns the token after it,
padding and prompts excluded) and decodes new tokens through the eval graph with the tier's current adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.data import Example, batches
from edge_sdk.protocol.messages import HeadMode
from edge_sdk.runtime import Backend
from edge_sdk.trainer import EvalReport, Trainer

IGNORE_INDEX = -100
"""Label of a position that is not trained on or scored (the bundle's `lora.ignore_index`)."""


@dataclass(frozen=True)
class Text:
    """A training or evaluation text; the tokens of `prompt`, which comes first, are context only (not learnt)."""

    text: str
    prompt: str = ""


@dataclass(frozen=True)
class _Sequence(Example):
    """A text as the trainer batches it: `x` is prompt + text, `prompt_tokens` how many leading tokens are context."""

    prompt_tokens: int = 0


@dataclass(frozen=True)
class PerplexityReport:
    """exp of the mean next-token negative log-likelihood over `tokens` scored positions."""

    perplexity: float
    loss: float
    tokens: int


def next_token_labels(input_ids: np.ndarray, attention_mask: np.ndarray,
                      prompt_tokens: Sequence[int] | None = None) -> np.ndarray:
    """One label per position, flattened (batch · sequence): position t learns token t + 1 where that token is
    real (attention mask 1) and past the example's prompt; every other position is IGNORE_INDEX."""
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = np.where(attention_mask[:, 1:] == 1, input_ids[:, 1:], IGNORE_INDEX)
    if prompt_tokens is not None:
        for row, count in enumerate(prompt_tokens):
            labels[row, :max(0, count - 1)] = IGNORE_INDEX
    return labels.reshape(-1)


class LanguageTrainer(Trainer):
    """Trains one rank tier of a causal-LM bundle on texts, scores perplexity, and generates.

    `fit` is the classification Trainer's, on next-token labels, and takes strings or `Text`s (or `Example`s
    whose x is the text); the LoRA adapter is exchanged, saved and loaded as for any tier.
    """

    tasks = ("causal-lm",)

    def __init__(self, bundle: str | Path, rank: int, *, device: str = "cpu", threads: int | None = None,
                 head: HeadMode = "shared", verify: bool = True, backend: Backend = "auto") -> None:
        super().__init__(bundle, rank, device=device, threads=threads, head=head, verify=verify, backend=backend)
        config = self.manifest.base_model.get("config", {})
        eos = config.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def perplexity(self, texts: Iterable[str | Text | Example], batch_size: int = 4) -> PerplexityReport:
        """Perplexity of the current model on `texts` (eval graph, dropout off), every scored token weighing the same."""
        report = self.evaluate(texts, batch_size)
        return PerplexityReport(perplexity=math.exp(report.loss), loss=report.loss, tokens=report.samples)

    def evaluate(self, data: Iterable[str | Text | Example], batch_size: int = 4) -> EvalReport:
        """Mean next-token loss and top-1 next-token accuracy over every scored position of `data` (`samples`:
        how many), as the federation client reports a device's local evaluation; macro-F1 is not defined."""
        examples = self.sequences(data)
        start = time.perf_counter()
        self.opened.eval_mode()
        total, hits, count = 0.0, 0, 0
        for batch in batches(examples, batch_size, lengths=self.encoder.lengths(examples)):
            feeds = self.encoder(batch)
            labels = self._batch_labels(batch, feeds)
            scored = labels != IGNORE_INDEX
            if scored.any():
                loss, logits = self.opened.run(self._inputs(feeds), labels)
                total += float(loss) * int(scored.sum())
                hits += int(np.sum(np.argmax(logits[scored], axis=-1) == labels[scored]))
                count += int(scored.sum())
        if count == 0:
            raise ValueError("No token to score: every text is a single token or all prompt.")
        return EvalReport(loss=total / count, accuracy=hits / count, macro_f1=math.nan, samples=count,
                          wall_seconds=time.perf_counter() - start)

    def generate(self, prompt: str, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0) -> str:
        """Continue `prompt` by up to `max_new_tokens` tokens with the current model, stopping at end-of-text:
        greedy at temperature 0 (deterministic), else sampled from the `top_k` most likely tokens (all by
        default) at `temperature`, from `seed`. The context keeps the last `max_seq_len` tokens."""
        if max_new_tokens < 0 or not math.isfinite(temperature) or temperature < 0:
            raise ValueError("max_new_tokens must be ≥ 0 and temperature a finite value ≥ 0.")
        rng = np.random.default_rng(seed)
        ids = list(self.encoder.tokenizer.encode(prompt).ids)
        if not ids:
            raise ValueError("The prompt has no tokens; give it at least one word.")
        new: list[int] = []
        self.opened.eval_mode()
        for _ in range(max_new_tokens):
            context = np.array([ids[-self.manifest.max_seq_len:]], dtype=np.int64)
            feeds = {"input_ids": context, "attention_mask": np.ones_like(context)}
            labels = np.full(context.size, IGNORE_INDEX, dtype=np.int64)
            _, logits = self.opened.run(self._inputs(feeds), labels)
            token = _choose(logits[-1].astype(np.float64), temperature, top_k, rng)
            if token in self.eos_ids:
                break
            ids.append(token)
            new.append(token)
        return self.encoder.tokenizer.decode(new)

    def sequences(self, texts: Iterable[str | Text | Example]) -> list[Example]:
        """`texts` as the examples `fit` batches: prompt and text joined, the prompt's token count kept."""
        out: list[Example] = []
        for item in texts:
            if isinstance(item, _Sequence):
                out.append(item)
                continue
            text = item if isinstance(item, Text) else Text(item.x if isinstance(item, Example) else item)
            if not isinstance(text.text, str) or not isinstance(text.prompt, str):
                raise ValueError("A language model trains on strings: give texts, Text(text, prompt) or text Examples.")
            prompt_tokens = len(self.encoder.tokenizer.encode(text.prompt).ids) if text.prompt else 0
            out.append(_Sequence(x=text.prompt + text.text, label=0, prompt_tokens=prompt_tokens))
        if not out:
            raise ValueError("No texts: the local dataset is empty.")
        return out

    def _materialize(self, data) -> list[Example]:
        return self.sequences(data)

    def _batch_labels(self, batch: Sequence[Example], feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        prompts = [getattr(e, "prompt_tokens", 0) for e in batch]
        return next_token_labels(feeds["input_ids"], feeds["attention_mask"], prompts)


def _choose(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """The next token: the argmax at temperature 0, else a draw from softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return int(np.argmax(logits))
    keep = np.argsort(logits)[::-1][:top_k] if top_k else np.arange(logits.size)
    scaled = logits[keep] / temperature
    probabilities = np.exp(scaled - scaled.max())
    return int(keep[rng.choice(keep.size, p=probabilities / probabilities.sum())])
