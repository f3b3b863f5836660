#!/usr/bin/env bash
# One emulated aarch64 device joins a federation on this host: Debian's qemu-user-static and arm64 Python 3.11
# (scripts/debian_root.py, no root), the device install from aarch64 wheels only (scripts/device-install.sh), then
# mosquitto and the aggregator on the host and `fedpeft-client` under qemu-aarch64 for ROUNDS rounds.
# Usage: bash scripts/aarch64-emulated.sh [DIR (default runs/aarch64)] [ROUNDS (default 2)]
# Needs the host venv (bash scripts/bootstrap.sh) and mosquitto; downloads ~130 MB once into DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:-runs/aarch64}")
rounds=${2:-2}
host=.venv/bin
[ -x $host/python ] || { echo "No host venv: run 'bash scripts/bootstrap.sh' first." >&2; exit 1; }
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { echo "No mosquitto: run 'bash scripts/system-packages.sh'." >&2; exit 1; }
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
mkdir -p "$dir"

[ -x "$dir/qemu/usr/bin/qemu-aarch64-static" ] || python3 scripts/debian_root.py "$dir/qemu" qemu-user-static --arch amd64
[ -x "$dir/root/usr/bin/python3.11" ] || python3 scripts/debian_root.py "$dir/root" python3.11 libstdc++6 --arch arm64
[ -d "$dir/site/onnxruntime" ] || PYTHON=$host/python bash scripts/device-install.sh "$dir/site" --only-binary=:all: \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  --python-version 3.11 --implementation cp --abi cp311
# The device's interpreter: a host script, so that sys.executable (the profile's probe subprocess) runs emulated too.
mkdir -p "$dir/bin"
cat > "$dir/bin/python3" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")/..
PYTHONHOME=/usr exec "$here/qemu/usr/bin/qemu-aarch64-static" -L "$here/root" -0 "$0" "$here/root/usr/bin/python3.11" "$@"
EOF
chmod +x "$dir/bin/python3"
[ -f "$dir/bundle/manifest.json" ] || $host/fedpeft-export --out "$dir/bundle" --optimizer sgd --scaling 2 --ranks 2,8
[ -f "$dir/data.jsonl" ] || $host/python -c "
import json, sys
from edge_sdk.datasets import rotten_tomatoes
with open(sys.argv[1], 'w') as f:
    for e in rotten_tomatoes()[::40][:200]:
        f.write(json.dumps({'text': e.x, 'label': e.label}) + '\n')" "$dir/data.jsonl"

port=$($host/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
run="$dir/run-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run"
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmessage_size_limit 0\npersistence false\n' "$port" > "$run/mosquitto.conf"
"$mosquitto" -c "$run/mosquitto.conf" > "$run/mosquitto.log" 2>&1 &
broker=$!
trap 'kill $broker ${aggregator:-} 2>/dev/null || true' EXIT
sleep 1

$host/fedpeft-aggregator --bundle "$dir/bundle" --broker "mqtt://127.0.0.1:$port" --federation aarch64 \
  --rounds "$rounds" --clients-per-round 1 --min-clients 1 --min-online 1 --steps 2 --batch-size 8 \
  --round-timeout 3600 --state-dir "$run/state" --metrics "$run/metrics.jsonl" > "$run/aggregator.log" 2>&1 &
aggregator=$!

echo "device: $("$dir/bin/python3" -c \
  'import platform; print(platform.machine(), "Python", platform.python_version())') under qemu-aarch64 7.2; log in $run"
started=$(date +%s)
PYTHONPATH="$dir/site:$PWD" "$dir/bin/python3" -S -m edge_sdk.client_cli --bundle "$dir/bundle" --broker "mqtt://127.0.0.1:$port" --federation aarch64 \
  --data "$dir/data.jsonl" --eval-fraction 0 --threads 2 --client-id arm64-device --state-dir "$run/client" \
  --max-rounds "$rounds" 2>&1 | tee "$run/client.log"
wait $aggregator
echo "aggregator: $(grep -c accepted "$run/aggregator.log") updates accepted over $rounds rounds; device wall $(( $(date +%s) - started )) s"
grep -E "accepted|round [0-9]+ closed|finished" "$run/aggregator.log" | tail -n $((rounds * 2 + 1))
