#!/usr/bin/env bash
# Create a private CA and a server certificate for the broker (for a real deployment use your PKI).
# Usage: make-certs.sh OUT_DIR [SERVER_NAME]   (SERVER_NAME defaults to localhost)
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [SERVER_NAME]}
name=${2:-localhost}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=FedPEFT CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=DNS:%s,IP:127.0.0.1\n" "$name" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile san.ext -out server.crt 2>/dev/null
rm -f server.csr san.ext ca.srl
chmod 600 ca.key server.key
echo "Wrote $out/ca.crt (give it to clients as --tls-ca), $out/server.crt and $out/server.key."
