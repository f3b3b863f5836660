#!/usr/bin/env bash
# Install the Debian packages the tests and examples use, when missing:
# mosquitto (the real MQTT broker the tests start), openssl (test TLS certificates) and
# dataset-fashion-mnist (real image data).
# Needs root or password-less sudo; elsewhere it says what to install and continues.
set -euo pipefail

packages=(mosquitto openssl dataset-fashion-mnist)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "Not a Debian/Ubuntu system: install ${missing[*]} by other means; the tests that use them fail until then." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "Cannot install ${missing[*]} without root: run 'sudo apt-get install -y ${missing[*]}' (the tests that use them fail until then)." >&2
    exit 0
  fi
fi
echo "Installing Debian packages: ${missing[*]}..."
log="$(mktemp)"
if ! { $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" ||
       { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "apt-get could not install ${missing[*]}; the full log is $log." >&2
  exit 1
fi
rm -f "$log"
