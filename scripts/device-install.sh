#!/usr/bin/env bash
# Install what a device on the portable training path needs (requirements-device.txt) into TARGET, a folder
# to put on PYTHONPATH beside this repository (or copy to the board), and print its size.
# Usage: bash scripts/device-install.sh TARGET [pip options, e.g. --platform manylinux2014_aarch64 --only-binary=:all:]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: bash scripts/device-install.sh TARGET [pip options]}
shift
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$python" -m pip install --quiet --no-deps --upgrade --target "$target" -r requirements-device.txt "$@"
# Test suites, test-only extension modules, type stubs and model-conversion tools: never imported when
# training or joining a federation.
find "$target" -type d \( -name tests -o -name testing \) -path '*numpy*' -prune -exec rm -rf {} +
find "$target" -name '*.pyi' -delete
find "$target"/numpy/_core \( -name '_simd.*' -o -name '_*_tests.*' \) -delete
rm -rf "$target"/numpy/f2py "$target"/numpy/distutils "$target"/bin \
       "$target"/onnxruntime/transformers "$target"/onnxruntime/quantization "$target"/onnxruntime/tools
echo "$(du -sm "$target" | cut -f1) MB in $target"
