"""Import onnxruntime and its on-device training API without importing torch.

Two places in onnxruntime 1.19 import torch eagerly: `import onnxruntime` probes for the
torch-based ORTModule (`onnxruntime.capi.onnxruntime_validation`), and
`onnxruntime/training/__init__.py` imports amp, optim and ORTModule. The on-device API in
`onnxruntime.training.api` needs only onnxruntime's C extension and numpy. Where torch is
installed beside the SDK (a workstation, this repository's test environment) those imports cost
~270 MB of memory and a second of start-up. So, before onnxruntime is first imported, we
register a bare package object for `onnxruntime.training` whose search path is the installed
folder, and mark `onnxruntime.training.ortmodule` as absent while onnxruntime probes for it
(a `None` entry in `sys.modules` makes that import raise ImportError, which the probe treats as
"no ORTModule"). The marker is removed afterwards. Import onnxruntime through this module.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


def _register_bare_training_package() -> None:
    root = importlib.util.find_spec("onnxruntime")
    folder = Path(root.origin).parent / "training" if root and root.origin else None
    if folder is None or not (folder / "api" / "module.py").is_file():
        raise ImportError(
            "onnxruntime training is not installed: pip install onnxruntime-training-cpu==1.19.2 "
            "(x86_64 Linux/Windows/macOS, CPython 3.10-3.12; see docs/devices.md for other devices)."
        )
    spec = importlib.machinery.ModuleSpec(_TRAINING, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    package = importlib.util.module_from_spec(spec)
    sys.modules[_TRAINING] = package


def _import_onnxruntime() -> types.ModuleType:
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    if _TRAINING not in sys.modules:
        _register_bare_training_package()
    blocked = _ORTMODULE not in sys.modules
    if blocked:
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]
    try:
        return importlib.import_module("onnxruntime")
    finally:
        if blocked and sys.modules.get(_ORTMODULE, 0) is None:
            del sys.modules[_ORTMODULE]


def _load_api() -> types.ModuleType:
    if _TRAINING not in sys.modules:
        _register_bare_training_package()
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as err:
        raise ImportError(
            "onnxruntime is installed without the training API (plain `onnxruntime`?). Install "
            "onnxruntime-training-cpu==1.19.2 instead; the two share one folder, never install both."
        ) from err


ort = _import_onnxruntime()
api = _load_api()
Module = api.Module
Optimizer = api.Optimizer
CheckpointState = api.CheckpointState
LinearLRScheduler = api.LinearLRScheduler

__all__ = ["CheckpointState", "LinearLRScheduler", "Module", "Optimizer", "ort"]
