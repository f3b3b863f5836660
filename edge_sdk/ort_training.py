"""Import onnxruntime's on-device training API without importing torch.

`onnxruntime/training/__init__.py` eagerly imports its torch-based modules (amp, optim,
ORTModule), but the on-device API in `onnxruntime.training.api` needs only onnxruntime's C
extension and numpy. When the real package is not imported yet we register a bare package
object for `onnxruntime.training` whose search path is the installed folder, so importing
`onnxruntime.training.api` loads those four files alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _load_api() -> types.ModuleType:
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "onnxruntime training is not installed: pip install onnxruntime-training-cpu==1.19.2 "
                "(x86_64 Linux/Windows/macOS, CPython 3.10-3.12; see docs/devices.md for other devices)."
            )
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules["onnxruntime.training"] = package
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as err:
        raise ImportError(
            "onnxruntime is installed without the training API (plain `onnxruntime`?). Install "
            "onnxruntime-training-cpu==1.19.2 instead; the two share one folder, never install both."
        ) from err


api = _load_api()
Module = api.Module
Optimizer = api.Optimizer
CheckpointState = api.CheckpointState
LinearLRScheduler = api.LinearLRScheduler

__all__ = ["CheckpointState", "LinearLRScheduler", "Module", "Optimizer"]
