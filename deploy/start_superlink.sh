#!/usr/bin/env bash
# Usage: deploy/start_superlink.sh [--certs DIR] [--dir RUN_DIR] [--host HOST] [--port PORT]
#                                  [--database FILE] [--insecure] [--no-auth]
#
# Starts the SuperLink (the federation's server) in the background with TLS and SuperNode
# authentication: only SuperNodes whose public keys were registered (register_node.sh) may join.
# Fleet, Control and Runtime APIs share one port (HOST:PORT).
#   --certs DIR     ca.crt, server.pem and server.key from make_certs.sh (default deploy/local/certs)
#   --dir RUN_DIR   where superlink.pid and superlink.log go (default deploy/local/run)
#   --host HOST     address to listen on (default 0.0.0.0: reachable by the nodes' machines)
#   --port PORT     (default 9091)
#   --database FILE SuperLink state, so that registered nodes survive a restart
#                   (default RUN_DIR/superlink.db; ":flwr-in-memory:" keeps it in memory)
#   --insecure      no TLS (loopback tests only; also FEDEDIT_INSECURE=1)
#   --no-auth       no SuperNode authentication (loopback tests only; also FEDEDIT_NO_AUTH=1)
# Env defaults: CERTS_DIR, RUN_DIR, SUPERLINK_HOST, SUPERLINK_PORT, SUPERLINK_DATABASE;
# SERVICE_FLWR_HOME (the SuperLink's FLWR_HOME, default RUN_DIR/flwr-superlink).
# Stop it with deploy/stop.sh RUN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CERTS_DIR="${CERTS_DIR:-$LOCAL_DIR/certs}"
RUN_DIR="${RUN_DIR:-$LOCAL_DIR/run}"
HOST="${SUPERLINK_HOST:-0.0.0.0}"
PORT="${SUPERLINK_PORT:-9091}"
DATABASE="${SUPERLINK_DATABASE:-}"
INSECURE="${FEDEDIT_INSECURE:-0}"
NO_AUTH="${FEDEDIT_NO_AUTH:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        --certs) CERTS_DIR="$2"; shift 2 ;;
        --dir) RUN_DIR="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --database) DATABASE="$2"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --no-auth) NO_AUTH=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
RUN_DIR="$(abspath "$RUN_DIR")"
CERTS_DIR="$(abspath "$CERTS_DIR")"
mkdir -p "$RUN_DIR"
DATABASE="${DATABASE:-$RUN_DIR/superlink.db}"
[[ "$DATABASE" == :* ]] || DATABASE="$(abspath "$DATABASE")"

args=(--host "$HOST" --port "$PORT" --database "$DATABASE" --disable-runtime-dependency-installation)
if [ "$INSECURE" = 1 ]; then
    info "WARNING: --insecure: no TLS, for loopback tests only"
    args+=(--insecure)
else
    for f in ca.crt server.pem server.key; do
        [ -f "$CERTS_DIR/$f" ] || die "$CERTS_DIR/$f missing: run deploy/make_certs.sh $CERTS_DIR HOSTNAME first"
    done
    args+=(--ssl-ca-certfile "$CERTS_DIR/ca.crt" --ssl-certfile "$CERTS_DIR/server.pem"
           --ssl-keyfile "$CERTS_DIR/server.key")
fi
if [ "$NO_AUTH" = 1 ]; then
    info "WARNING: --no-auth: any SuperNode may join, for loopback tests only"
else
    args+=(--enable-supernode-auth)
fi

# never `uv sync` the project's dependencies (torch) per run; no telemetry or update checks
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# the ServerApp's installed apps go here (not into the operator's ~/.flwr)
export FLWR_HOME="$(abspath "${SERVICE_FLWR_HOME:-$RUN_DIR/flwr-superlink}")"

superlink="$(find_bin flower-superlink)"
cd "$PROJECT_DIR"  # the ServerApp runs here: a relative output-dir (default runs) is the project's runs/
start_bg "$RUN_DIR/superlink.pid" "$RUN_DIR/superlink.log" "$superlink" "${args[@]}"
probe_host="$HOST"
case "$probe_host" in 0.0.0.0|"::"|"[::]") probe_host=127.0.0.1 ;; esac
wait_for "flower-superlink" "$RUN_DIR/superlink.pid" "$RUN_DIR/superlink.log" "${SUPERLINK_START_TIMEOUT:-60}" \
    port_open "$probe_host" "$PORT"
info "SuperLink on $HOST:$PORT (pid $(cat "$RUN_DIR/superlink.pid"), log $RUN_DIR/superlink.log)"
