"""Turn batches of examples into the graph inputs of a bundle: tokenized text or normalized images."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from edge_sdk.data import Example
from edge_sdk.protocol.manifest import Manifest


class Encoder(Protocol):
    """Builds the graph's named inputs for a batch; `lengths` gives per-example cost for bucketing."""

    def __call__(self, batch: Sequence[Example]) -> dict[str, np.ndarray]: ...

    def lengths(self, examples: Sequence[Example]) -> list[int] | None: ...


class TextEncoder:
    """Tokenizes with the bundle's tokenizer.json and pads each batch to its own longest sequence.

    Fixed padding to max_seq_len would spend most of the compute on padding: review snippets
    average ~25 tokens.
    """

    def __init__(self, bundle: str | Path, manifest: Manifest, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None) -> None:
        info = manifest.tokenizer
        if "file" not in info:
            raise ValueError(f"Bundle task '{manifest.task}' has no tokenizer; TextEncoder is for text tasks.")
        self.max_len = min(max_length or manifest.max_seq_len, manifest.max_seq_len)
        self.tokenizer = Tokenizer.from_file(str(Path(bundle) / info["file"]))
        self.tokenizer.enable_truncation(max_length=self.max_len)
        self.tokenizer.enable_padding(pad_id=int(info["pad_token_id"]), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, batch: Sequence[Example]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64, batch × longest in the batch)."""
        encodings = self.tokenizer.encode_batch([_text(e) for e in batch])
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def lengths(self, examples: Sequence[Example]) -> list[int]:
        """Token count of each example (after truncation), for length bucketing."""
        encodings = self.tokenizer.encode_batch([_text(e) for e in examples])
        return [sum(e.attention_mask) for e in encodings]


class ImageEncoder:
    """Scales, normalizes and lays out H×W(×C) arrays as the model's pixel_values (batch × C × H × W).

    Mean/std come from the bundle's preprocessor_config.json when the model shipped one, else 0.5.
    Grayscale images are repeated over the model's channels; an image whose side divides the
    model's is upsampled by pixel repetition (Fashion-MNIST 28 → 224); other sizes are refused.
    """

    def __init__(self, bundle: str | Path, manifest: Manifest) -> None:
        config = manifest.base_model.get("config", {})
        self.size = int(config.get("image_size", 224))
        self.channels = int(config.get("num_channels", 3))
        processor: dict = {}
        if "preprocessor" in manifest.tokenizer:
            processor = json.loads((Path(bundle) / manifest.tokenizer["preprocessor"]).read_text())
        self.mean = _per_channel(processor.get("image_mean", 0.5), self.channels)
        self.std = _per_channel(processor.get("image_std", 0.5), self.channels)

    def __call__(self, batch: Sequence[Example]) -> dict[str, np.ndarray]:
        images = np.stack([self._image(e.x) for e in batch])
        return {"pixel_values": ((images - self.mean) / self.std).astype(np.float32)}

    def lengths(self, examples: Sequence[Example]) -> None:
        """Images all cost the same: no bucketing."""
        return None

    def _image(self, x: object) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim not in (2, 3):
            raise ValueError("ImageEncoder needs H×W or H×W×C numpy arrays.")
        image = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        image = image[:, :, None] if image.ndim == 2 else image
        height, width, channels = image.shape
        if height != width or self.size % height:
            raise ValueError(f"Image of {height}×{width} cannot be fitted to the model's {self.size}×{self.size}.")
        factor = self.size // height
        if factor > 1:
            image = image.repeat(factor, axis=0).repeat(factor, axis=1)
        if channels == 1 and self.channels > 1:
            image = np.repeat(image, self.channels, axis=2)
        elif channels != self.channels:
            raise ValueError(f"Image has {channels} channels; the model takes {self.channels}.")
        return image.transpose(2, 0, 1)


def encoder_for(bundle: str | Path, manifest: Manifest, pad_to_multiple_of: int | None = None) -> TextEncoder | ImageEncoder:
    """The encoder matching the bundle's task (`pad_to_multiple_of` applies to text)."""
    if manifest.task == "img-cls":
        return ImageEncoder(bundle, manifest)
    return TextEncoder(bundle, manifest, pad_to_multiple_of=pad_to_multiple_of)


def _text(example: Example) -> str:
    if not isinstance(example.x, str):
        raise ValueError("TextEncoder needs examples whose x is a string.")
    return example.x


def _per_channel(value: float | list[float], channels: int) -> np.ndarray:
    values = np.broadcast_to(np.asarray(value, dtype=np.float32), (channels,))
    return values.reshape(channels, 1, 1)
