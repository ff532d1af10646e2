#!/usr/bin/env bash
# Usage: deploy/register_node.sh PUBKEY [CONNECTION]
#
# Registers a SuperNode's public key (NAME.pub from make_node_key.sh) with the SuperLink, so that
# the SuperNode holding the private key may join (`flwr supernode register`). Run by the SuperLink
# operator, after start_superlink.sh, once per organisation.
# CONNECTION (default "fededit") names a SuperLink connection in $FLWR_HOME/config.toml
# (FLWR_HOME defaults to deploy/local/flwr). When SUPERLINK_ADDRESS is set (e.g.
# superlink.example.org:9091), the connection is (re)written first, trusting CA_CERT
# (default deploy/local/certs/ca.crt; CA_CERT=--insecure for a loopback test without TLS).
# Env: NODE_NAME (a label stored with the key, default the key's file name).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -ge 1 ] && [ $# -le 2 ] || { usage >&2; exit 2; }
PUBKEY="$1"
CONNECTION="${2:-fededit}"
export FLWR_HOME="$(abspath "${FLWR_HOME:-$LOCAL_DIR/flwr}")"
[ -f "$PUBKEY" ] || die "$PUBKEY: no such public key file"
grep -q '^ecdsa-sha2-nistp384 ' "$PUBKEY" || die "$PUBKEY is not an ECDSA P-384 public key (make_node_key.sh makes one)"

if [ -n "${SUPERLINK_ADDRESS:-}" ]; then
    write_connection "$FLWR_HOME" "$CONNECTION" "$SUPERLINK_ADDRESS" "${CA_CERT:-$LOCAL_DIR/certs/ca.crt}"
fi
grep -q "^\[superlink\.$CONNECTION\]" "$FLWR_HOME/config.toml" 2>/dev/null \
    || die "no connection [superlink.$CONNECTION] in $FLWR_HOME/config.toml: set SUPERLINK_ADDRESS (and CA_CERT)"

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
name="${NODE_NAME:-$(basename "$PUBKEY" .pub)}"
"$(find_bin flwr)" supernode register "$PUBKEY" "$CONNECTION" --name "$name"
