"""Text bundles gather token embeddings on the device from disk: the table is in no graph and no buffer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from edge_sdk.bundle import open_tier
from edge_sdk.embeddings import EmbeddingRows
from edge_sdk.protocol.manifest import BundleError, read_manifest

TABLE = "m.bert.embeddings.word_embeddings.weight"


def test_rows_are_the_table_rows_for_any_ids(minilm_bundle: Path) -> None:
    path = minilm_bundle / "base_weights.safetensors"
    table = load_file(str(path))[TABLE]
    rows = EmbeddingRows(path, TABLE)
    assert (rows.vocab, rows.dim) == table.shape
    rng = np.random.default_rng(0)
    for ids in (rng.integers(0, rows.vocab, (16, 64)), np.array([[0, 1, 2, 3, rows.vocab - 1, 2, 2]]),
                np.arange(100, 140).reshape(2, 4, 5), np.zeros((0, 3), np.int64)):
        got = rows(ids)
        assert got.shape == ids.shape + (rows.dim,) and got.dtype == np.float32
        np.testing.assert_array_equal(got, table[ids])
    for bad in (np.array([[rows.vocab]]), np.array([[-1, 5]])):
        with pytest.raises(ValueError, match="Token ids must lie in"):
            rows(bad)


def test_rows_refuse_a_missing_or_malformed_table(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"half": np.zeros((4, 2), np.float16), "cube": np.zeros((2, 2, 2), np.float32)}, str(path))
    for name, message in (("absent", "has no tensor 'absent'"), ("half", "not a 2-D float32"),
                          ("cube", "not a 2-D float32")):
        with pytest.raises(BundleError, match=message):
            EmbeddingRows(path, name)
    truncated = tmp_path / "truncated.safetensors"
    save_file({"table": np.ones((64, 8), np.float32)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(BundleError, match="ends inside"):
        EmbeddingRows(truncated, "table")(np.array([63]))
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BundleError, match="not a safetensors file"):
        EmbeddingRows(tmp_path / "text.safetensors", "table")


@pytest.mark.parametrize("lookup", [{"table": TABLE, "ids": "token_ids", "input": "input_ids.embedded"},
                                    {"table": TABLE, "ids": "input_ids"}, ["input_ids"]])
def test_a_malformed_lookup_is_refused_when_the_manifest_is_read(minilm_bundle: Path, tmp_path: Path,
                                                                  lookup: object) -> None:
    data = json.loads((minilm_bundle / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "embedding_lookup": lookup}))
    with pytest.raises(BundleError, match="embedding_lookup"):
        read_manifest(tmp_path)


def test_the_table_stays_out_of_the_training_graphs_and_the_parameter_buffer(minilm_bundle: Path) -> None:
    manifest = read_manifest(minilm_bundle)
    assert manifest.embedding_lookup == {"table": TABLE, "ids": "input_ids", "input": "input_ids.embedded"}
    with open(minilm_bundle / "base_weights.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    vocab, dim = header[TABLE]["shape"]
    for tier in manifest.tiers:
        assert TABLE not in tier.parameter_order
        for graph in (tier.training_model, tier.eval_model):
            model = onnx.load(str(minilm_bundle / tier.dir / graph))
            assert "input_ids.embedded" in {i.name for i in model.graph.input}
            assert not any(TABLE in node.input for node in model.graph.node)
        inference = onnx.load(str(minilm_bundle / tier.dir / tier.inference_model), load_external_data=False)
        assert any(node.op_type == "Gather" and node.input[0] == TABLE for node in inference.graph.node)
        opened = open_tier(minilm_bundle, tier.rank)
        held = opened.module.get_parameters_size(trainable_only=False)
        assert held == manifest.base_weights["parameters"] - vocab * dim + tier.trainable_count
