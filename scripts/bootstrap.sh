#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with the pinned dependencies.
# Idempotent: does nothing when the lock files have not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/system-packages.sh

venv=${FEDPEFT_VENV:-.venv}
stamp=$(cat requirements.lock requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.fedpeft-stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

python=""
for candidate in ${PYTHON:-} python3.11 python3.12 python3.10 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "FedPEFT needs Python 3.10-3.12 (onnxruntime-training 1.19.2 has wheels for those only)." >&2
  exit 1
fi

echo "Setting up $venv with $($python --version) and the pinned dependencies (first run: a few minutes)..."
log="$(mktemp)"
if ! { "$python" -m venv "$venv" &&
       "$venv/bin/python" -m pip install -r requirements.lock &&
       "$venv/bin/python" -m pip install --no-deps -r requirements-nodeps.txt &&
       "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e .; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "Dependency installation failed; the full log is $log." >&2
  exit 1
fi
rm -f "$log"
echo "$stamp" > "$venv/.fedpeft-stamp"
