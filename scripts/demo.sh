#!/usr/bin/env bash
# Set up (idempotently) and run the FedPEFT demo; extra arguments go to examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python examples/quickstart.py "$@"
