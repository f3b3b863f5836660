"""On-device inference (`edge_sdk.predict`): the inference graph with a trained adapter, without the training package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_sdk.datasets import rotten_tomatoes
from edge_sdk.predict import Predictor, predict
from edge_sdk.protocol import AdapterHeader, encode_adapter
from edge_sdk.trainer import Trainer
from tests.conftest import run_without_torch
from tests.test_trainer import _logits

REVIEWS = rotten_tomatoes()[:160]


def test_predictor_gives_the_trained_adapters_logits_and_follows_a_new_adapter(minilm_bundle: Path) -> None:
    trainer = Trainer(minilm_bundle, 8, threads=2)
    start = Predictor(minilm_bundle, rank=8, threads=2)
    np.testing.assert_allclose(start.logits(REVIEWS[:8]), _logits(trainer, REVIEWS[:8]), atol=1e-5)
    trainer.fit(REVIEWS[:128], epochs=1, batch_size=16, lr=3e-3)
    trained = trainer.get_adapter()
    start.set_adapter(trained)
    scores = start.logits(REVIEWS[128:])
    np.testing.assert_allclose(scores, _logits(trainer, REVIEWS[128:]), atol=1e-5)
    assert start.predict(REVIEWS[128:]) == scores.argmax(axis=1).tolist()
    np.testing.assert_allclose(start.probabilities(REVIEWS[128:]).sum(axis=1), 1.0, rtol=1e-9)
    assert predict(minilm_bundle, trained, [e.x for e in REVIEWS[128:132]]) == \
        [start.labels[i] for i in scores[:4].argmax(axis=1)]


def test_predictor_runs_where_neither_torch_nor_onnxruntime_training_can_be_imported(minilm_bundle: Path,
                                                                                      tmp_path: Path) -> None:
    trainer = Trainer(minilm_bundle, 2, threads=2)
    trainer.fit(REVIEWS[:64], epochs=1, batch_size=16, lr=3e-3)
    adapter = trainer.get_adapter()
    file = tmp_path / "global.fpa"
    file.write_bytes(encode_adapter(adapter, AdapterHeader(federation="f", round=1, client_id="c", rank=2,
                                                           num_samples=64, dtype="float32")))
    expected = _logits(trainer, REVIEWS[64:72])
    result = run_without_torch(f"""
        class _NoTrainingBuild(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("onnxruntime.training"):
                    raise ImportError("a plain onnxruntime build has no training")
                return None
        sys.meta_path.insert(0, _NoTrainingBuild())
        import json
        from pathlib import Path
        from edge_sdk.datasets import rotten_tomatoes
        from edge_sdk.predict import Predictor
        from edge_sdk.protocol import decode_adapter
        from edge_sdk.protocol.manifest import read_manifest
        bundle = Path({str(minilm_bundle)!r})
        _, adapter = decode_adapter(Path({str(file)!r}).read_bytes(), read_manifest(bundle))
        logits = Predictor(bundle, adapter, threads=2).logits(rotten_tomatoes()[64:72])
        print(json.dumps({{"logits": logits.tolist(), "training": "onnxruntime.training" in sys.modules}}))
    """)
    assert result["training"] is False
    np.testing.assert_allclose(np.array(result["logits"]), expected, atol=1e-5)
    assert json.dumps(result)
