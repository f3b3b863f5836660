"""Write an adapter as a standard Hugging Face peft adapter folder, without peft on the device.

The folder (adapter_model.safetensors + adapter_config.json) loads with
`PeftModel.from_pretrained(base_model, folder)`; key names and the config come from the bundle
manifest, which recorded them from peft at export time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edge_sdk.adapter import Adapter, adapter_to_parameters
from edge_sdk.manifest import Manifest

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def write_peft_adapter(adapter: Adapter, manifest: Manifest, folder: str | Path) -> Path:
    """Write `adapter` to `folder` atomically (an existing folder is replaced only once the new one is complete).

    Include the head in `adapter` when the bundle trains it, or the loaded model keeps the base
    model's head.
    """
    target = Path(folder)
    values = adapter_to_parameters(manifest, adapter)
    tensors = {manifest.peft_keys[name]: np.ascontiguousarray(value, dtype=np.float32) for name, value in values.items()}
    config = {**manifest.peft_config, "r": adapter.rank, "inference_mode": True}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        _swap_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _swap_in(work: Path, target: Path) -> None:
    """Rename `work` to `target`; an existing `target` is moved aside first and removed after."""
    if not target.exists():
        work.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    work.rename(target)
    shutil.rmtree(old, ignore_errors=True)
