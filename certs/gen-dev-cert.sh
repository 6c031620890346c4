#!/usr/bin/env bash
# Makes a local development CA and a server certificate signed by it, for
# running the relay with TLS on localhost:
#
#   certs/gen-dev-cert.sh
#   cargo run --release --bin relay -- --tls-cert certs/server.pem --tls-key certs/server-key.pem
#   relay-cli --server wss://localhost:8080/v1/websocket --ca-cert certs/ca.pem ...
#
# Needs only openssl. The generated *.pem files are ignored by git.
set -euo pipefail
cd "$(dirname "$0")"
days=825
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout ca-key.pem -out ca.pem -days "$days" -subj "/CN=signal-relay dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
  -out server.pem -days "$days" \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n') 2>/dev/null
rm -f server.csr ca.srl
chmod 600 ca-key.pem server-key.pem
echo "wrote certs/ca.pem (trust this), certs/server.pem and certs/server-key.pem"
