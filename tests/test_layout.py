"""The tree's rooms: the aggregator process never loads the device runtime, and the installed packages are the product's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_RUNTIME = ("onnxruntime", "tokenizers", "torch", "transformers", "peft")


def test_importing_the_aggregator_loads_no_device_runtime() -> None:
    code = (
        "import sys, json; import aggregator.service, aggregator.cli, aggregator.round_merge, aggregator.strategies; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(DEVICE_RUNTIME)!r}))))"
    )
    env = {**os.environ, "FEDPEFT_MERGE_BACKEND": "numpy"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.slow
def test_the_wheel_installs_the_product_packages_and_no_examples(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("aggregator", "edge_sdk", "export", "fedpeft_sim", "examples", "tests"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("fedpeft-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"aggregator", "edge_sdk", "export", "fedpeft_sim"}
