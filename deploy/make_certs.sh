#!/usr/bin/env bash
# Usage: deploy/make_certs.sh [OUT_DIR] [HOSTNAME_OR_IP...]
#
# Makes a certificate authority (ca.crt, ca.key) and the SuperLink's TLS certificate (server.pem,
# server.key) signed by it, valid for localhost, 127.0.0.1, ::1 and every HOSTNAME_OR_IP given
# (the names the SuperNodes and the `flwr` CLI use to reach the SuperLink).
# OUT_DIR defaults to deploy/local/certs. Existing files are not overwritten unless FORCE=1.
# Env: DAYS (validity, default 365), CA_SUBJECT, SERVER_SUBJECT.
#
# Give ca.crt (never ca.key or server.key) to every organisation and to whoever runs `flwr run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT_DIR="${1:-$LOCAL_DIR/certs}"
[ $# -gt 0 ] && shift
DAYS="${DAYS:-365}"
CA_SUBJECT="${CA_SUBJECT:-/CN=fededit federation CA}"
SERVER_SUBJECT="${SERVER_SUBJECT:-/CN=fededit superlink}"
command -v openssl >/dev/null || die "openssl not found"

mkdir -p "$OUT_DIR"
if [ -e "$OUT_DIR/ca.crt" ] && [ "${FORCE:-0}" != 1 ]; then
    die "$OUT_DIR/ca.crt exists: set FORCE=1 to make new certificates (every node then needs the new ca.crt)"
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done

umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

openssl genrsa -out "$OUT_DIR/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$OUT_DIR/ca.key" -sha256 -days "$DAYS" -subj "$CA_SUBJECT" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$OUT_DIR/ca.crt"

openssl genrsa -out "$OUT_DIR/server.key" 4096 2>/dev/null
openssl req -new -key "$OUT_DIR/server.key" -subj "$SERVER_SUBJECT" -out "$tmp/server.csr"
cat >"$tmp/ext.cnf" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$OUT_DIR/ca.crt" -CAkey "$OUT_DIR/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$DAYS" -sha256 -extfile "$tmp/ext.cnf" -out "$OUT_DIR/server.pem" 2>/dev/null
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.pem"
openssl verify -CAfile "$OUT_DIR/ca.crt" "$OUT_DIR/server.pem" >/dev/null

info "CA: $OUT_DIR/ca.crt (keep $OUT_DIR/ca.key offline)"
info "SuperLink: $OUT_DIR/server.pem, $OUT_DIR/server.key (subjectAltName $san)"
