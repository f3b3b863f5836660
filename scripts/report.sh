#!/usr/bin/env bash
# Set up (idempotently) and regenerate docs/results.md; --quick for the few-minute variant.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [[ " $* " == *" --quick "* ]]; then
  exec .venv/bin/python -m fedpeft_sim.cli -v report "$@"
fi
exec .venv/bin/python -m fedpeft_sim.cli -v report --docs docs/results.md "$@"
