"""Write an adapter as a standard Hugging Face peft adapter folder, without peft on the device.

The folder (adapter_model.safetensors + adapter_config.json) loads with
`PeftModel.from_pretrained(base_model, folder)` or `AutoPeftModelForSequenceClassification`; key names
and the config come from the bundle manifest, which recorded them from peft at export time. peft
builds the head's config from the base model's hub config, so the task's class names travel in
labels.json (a list in label order) and are passed as `id2label=dict(enumerate(names))` and the
matching `label2id`: README.md shows the call.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from edge_sdk.files import sha256_file
from edge_sdk.protocol.adapter import Adapter, adapter_to_parameters
from edge_sdk.protocol.manifest import BundleError, Manifest

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
LABELS_FILE = "labels.json"


def write_peft_adapter(
    adapter: Adapter, manifest: Manifest, folder: str | Path, bundle: str | Path | None = None
) -> Path:
    """Write `adapter` to `folder` atomically (an existing folder is replaced only once the new one is complete).

    Include the head in `adapter` when the bundle trains it, or the loaded model keeps the base
    model's head. The config names the base by the hub id the export recorded, and, given the
    bundle's folder `bundle`, the tokenizer files are copied beside the weights, so the folder
    loads on any machine. A `--svd-init` (FeDeRA) bundle needs `bundle`: see `_onto_original_base`.
    """
    if manifest.lora.full_finetune:
        raise BundleError("A --full-finetune bundle trains the model's own weights, which a peft adapter cannot hold.")
    target = Path(folder)
    values = adapter_to_parameters(manifest, adapter)
    config = {**manifest.peft_config, "r": adapter.rank, "inference_mode": True,
              "lora_alpha": manifest.tier(adapter.rank).lora_pairs[0].scaling * adapter.rank,
              "base_model_name_or_path": manifest.base_model.get("id") or manifest.peft_config["base_model_name_or_path"],
              "modules_to_save": _unique(manifest.peft_config.get("modules_to_save"))}
    if manifest.lora.svd_init:
        if bundle is None:
            raise BundleError("This bundle was exported with --svd-init; pass its folder (bundle=) to write "
                              "a peft adapter.")
        values, config = _onto_original_base(values, config, manifest, Path(bundle))
    tensors = {manifest.peft_keys[name]: np.ascontiguousarray(value, dtype=np.float32)
               for name, value in values.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if manifest.labels:
            (work / LABELS_FILE).write_text(json.dumps(manifest.labels))
        if bundle is not None:
            for name in manifest.tokenizer.get("files", []):
                _link_or_copy(Path(bundle) / manifest.tokenizer["dir"] / name, work / name)
        _swap_in(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _onto_original_base(values: dict[str, np.ndarray], config: dict, manifest: Manifest,
                        bundle: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Re-express an adapter over the residual base as a peft adapter over the original weights.

    The bundle's base is W − P (P: the principal part, saved at export), so the original-base update
    is s·B·A − P = s·[B, −P_B/s]·[A; P_A]: rank r + prefix at the same scaling, as peft converts PiSSA.
    """
    init = manifest.lora.svd_init
    assert init is not None
    path = bundle / init.file
    if not path.is_file() or sha256_file(path) != init.sha256:
        raise BundleError(f"{path} is missing or does not match the manifest; re-export the bundle.")
    principal = load_file(str(path))
    out = dict(values)
    pairs = manifest.tier(config["r"]).lora_pairs
    for pair in pairs:
        part_a, part_b = principal[f"{pair.layer}.A"], principal[f"{pair.layer}.B"]
        out[pair.a] = np.concatenate([values[pair.a], part_a])
        out[pair.b] = np.concatenate([values[pair.b], -part_b / pair.scaling], axis=1)
    rank = config["r"] + init.prefix_rank
    return out, {**config, "r": rank, "lora_alpha": pairs[0].scaling * rank}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (every round's folder shares the bundle's files), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _unique(names: list[str] | None) -> list[str] | None:
    """`names` without repeats, in order (peft lists the classifier once per head module name it matched)."""
    return None if names is None else list(dict.fromkeys(names))


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
