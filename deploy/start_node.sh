#!/usr/bin/env bash
# Usage: deploy/start_node.sh --name NAME --requests FILE --superlink HOST:PORT --key PRIVATE_KEY
#                             [--model MODEL] [--device DEVICE] [--dtype DTYPE] [--ca CA_CERT]
#                             [--secret-file FILE] [--retired-secret-file FILE]... [--allow-plaintext-mkvs]
#                             [--state-dir DIR] [--dir RUN_DIR]
#                             [--worker ADDRESS] [--port PORT] [--app-hash SHA256] [--insecure]
#
# Starts one organisation's side of the federation, on its own (GPU) machine:
#  1. its edit worker (`fededit-worker`), a long-lived process that loads MODEL on DEVICE once
#     and does every edit step; it listens on a Unix socket only this user can open;
#  2. once the worker answers its health check, the SuperNode (`flower-supernode`), which connects
#     to the SuperLink over TLS, authenticates with PRIVATE_KEY (registered beforehand with
#     register_node.sh) and runs a thin ClientApp per message that forwards it to the worker.
#   --name NAME         this client's name in the federation and its reports (e.g. hospital-a)
#   --requests FILE     this organisation's private edit requests (JSONL / CounterFact / zsRE);
#                       read by the worker only, never sent to the server
#   --superlink H:P     the SuperLink's address as named in its certificate (e.g. fl.example.org:9091)
#   --key FILE          the SuperNode's private key (make_node_key.sh)
#   --model MODEL       the base model, the same for every organisation (default smollm2-135m);
#                       the run's `model` run config must name the same model
#   --device DEVICE     where the worker puts it (default cuda:0); --dtype fp32|bf16|fp16 (default fp32)
#   --ca FILE           the federation CA certificate (default deploy/local/certs/ca.crt)
#   --secret-file FILE  the federation secret shared by the organisations, never by the server
#                       (default deploy/local/federation.secret; see README)
#   --retired-secret-file FILE  an earlier federation secret (repeat for several): it still opens
#                       MKV sets sealed under it, nothing new is sealed with it (README, rotation)
#   --allow-plaintext-mkvs  upload MKVs unsealed when a run asks for it (seal-mkvs = false);
#                       without it this client refuses such runs
#   --state-dir DIR     this client's checkpoints (default deploy/local/state/NAME)
#   --dir RUN_DIR       PID files and logs (default deploy/local/run)
#   --worker ADDRESS    the worker's address (default unix:RUN_DIR/worker-NAME.sock)
#   --port PORT         the SuperNode's local ClientAppIo/Runtime API port (default 9094; give each
#                       SuperNode on one machine its own)
#   --app-hash SHA256   run only the app bundle with this sha256 (deploy/app_hash.sh prints it; repeat
#                       to accept several): the SuperNode starts with --isolation process and its
#                       tasks run through fededit-superexec / fededit-clientapp, which refuse any other
#                       bundle before unpacking it (client_app/pinned.py)
#   --insecure          no TLS and no node key (loopback tests only; also FEDEDIT_INSECURE=1)
# Env: WORKER_START_TIMEOUT (seconds to wait for the model to load, default 900), SERVICE_FLWR_HOME
# (the SuperNode's FLWR_HOME, where it installs the apps it runs; default RUN_DIR/flwr-NAME).
# Stop both with deploy/stop.sh RUN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAME="" REQUESTS="" SUPERLINK="" KEY="" WORKER="" STATE_DIR=""
MODEL="${FEDEDIT_MODEL:-smollm2-135m}"
DEVICE="${FEDEDIT_DEVICE:-cuda:0}"
DTYPE="${FEDEDIT_DTYPE:-fp32}"
CA="${CA_CERT:-$LOCAL_DIR/certs/ca.crt}"
SECRET_FILE="${FEDEDIT_SECRET_FILE:-$LOCAL_DIR/federation.secret}"
RUN_DIR="${RUN_DIR:-$LOCAL_DIR/run}"
PORT="${SUPERNODE_PORT:-9094}"
INSECURE="${FEDEDIT_INSECURE:-0}"
APP_HASHES=() RETIRED=() ALLOW_PLAINTEXT=false
while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --superlink) SUPERLINK="$2"; shift 2 ;;
        --key) KEY="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --dtype) DTYPE="$2"; shift 2 ;;
        --ca) CA="$2"; shift 2 ;;
        --secret-file) SECRET_FILE="$2"; shift 2 ;;
        --retired-secret-file) RETIRED+=("$2"); shift 2 ;;
        --allow-plaintext-mkvs) ALLOW_PLAINTEXT=true; shift ;;
        --state-dir) STATE_DIR="$2"; shift 2 ;;
        --dir) RUN_DIR="$2"; shift 2 ;;
        --worker) WORKER="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --app-hash) APP_HASHES+=("$2"); shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$NAME" ] || die "--name is required"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name may hold letters, digits, '.', '_' and '-' only"
[ -n "$REQUESTS" ] || die "--requests is required"
[ -n "$SUPERLINK" ] || die "--superlink is required"
[ -f "$REQUESTS" ] || die "$REQUESTS: no such request file"
[ -f "$SECRET_FILE" ] \
    || die "$SECRET_FILE: no federation secret (deploy/README.md: one organisation makes it, all share it)"
for file in ${RETIRED[@]+"${RETIRED[@]}"}; do
    [ -f "$file" ] || die "--retired-secret-file $file: no such file"
    [[ "$file" != *,* ]] || die "--retired-secret-file $file: a path without commas, please"
done
for hash in ${APP_HASHES[@]+"${APP_HASHES[@]}"}; do
    [[ "$hash" =~ ^[0-9a-f]{64}$ ]] || die "--app-hash $hash: not a sha256 (64 lowercase hex digits)"
done
if [ "$INSECURE" != 1 ]; then
    [ -n "$KEY" ] || die "--key is required (the SuperNode's private key)"
    [ -f "$KEY" ] || die "$KEY: no such private key"
    [ -f "$CA" ] || die "$CA: no CA certificate"
fi

RUN_DIR="$(abspath "$RUN_DIR")"
REQUESTS="$(abspath "$REQUESTS")"
SECRET_FILE="$(abspath "$SECRET_FILE")"
STATE_DIR="$(abspath "${STATE_DIR:-$LOCAL_DIR/state/$NAME}")"
CA="$(abspath "$CA")"
[ -z "$KEY" ] || KEY="$(abspath "$KEY")"
NODE_FLWR_HOME="$(abspath "${SERVICE_FLWR_HOME:-$RUN_DIR/flwr-$NAME}")"
WORKER="${WORKER:-unix:$RUN_DIR/worker-$NAME.sock}"
for value in "$NAME" "$REQUESTS" "$SECRET_FILE" "$STATE_DIR" "$WORKER" "$DEVICE"; do
    [[ "$value" != *'"'* ]] || die "$value: a node-config value may not hold a double quote"
done
if [[ "$WORKER" == unix:* ]] && [ "${#WORKER}" -gt 100 ]; then
    die "worker socket path ${WORKER#unix:} is too long for a Unix socket: use a shorter --dir or --worker"
fi
mkdir -p "$RUN_DIR" "$STATE_DIR"

# the processes: no `uv sync` per run, no telemetry or update checks
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
python="$(find_bin python)"
cd "$PROJECT_DIR"

# 1. the edit worker, and its health check
worker_pid="$RUN_DIR/worker-$NAME.pid"
worker_log="$RUN_DIR/worker-$NAME.log"
start_bg "$worker_pid" "$worker_log" "$(find_bin fededit-worker)" -v --address "$WORKER" \
    --preload "$MODEL" --device "$DEVICE" --dtype "$DTYPE"
info "edit worker $NAME (pid $(cat "$worker_pid")) loading $MODEL on $DEVICE; log $worker_log"
# the health check of the ClientApp (RemoteWorker.health), polled until the model is loaded
worker_failed() {
    tail -n 20 "$worker_log" >&2 || true
    stop_group "$worker_pid"
    die "edit worker $NAME is not serving (log $worker_log)"
}
"$python" - "$WORKER" "$(cat "$worker_pid")" "${WORKER_START_TIMEOUT:-900}" <<'PY' || worker_failed
import os, sys, time
from client_app.worker_service import RemoteWorker, WorkerUnavailable

address, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    worker = RemoteWorker(address)  # a new channel each time: no reconnect back-off
    try:
        worker.health(timeout=2)
        break
    except WorkerUnavailable as err:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"the edit worker (pid {pid}) exited")
        if time.monotonic() > deadline:
            sys.exit(f"{err} (after {timeout:.0f} s)")
    finally:
        worker.close()
    time.sleep(0.5)
PY
info "edit worker $NAME answers on $WORKER"

# 2. the SuperNode
node_config="name=\"$NAME\" worker=\"$WORKER\" requests=\"$REQUESTS\" device=\"$DEVICE\" dtype=\"$DTYPE\""
node_config+=" state-dir=\"$STATE_DIR\" secret-file=\"$SECRET_FILE\" allow-plaintext-mkvs=$ALLOW_PLAINTEXT"
if [ ${#RETIRED[@]} -gt 0 ]; then
    node_config+=" retired-secret-files=\"$(IFS=,; echo "${RETIRED[*]}")\""
fi
args=(--superlink "$SUPERLINK" --port "$PORT" --node-config "$node_config")
if [ "$INSECURE" = 1 ]; then
    info "WARNING: --insecure: no TLS and no node key, for loopback tests only"
    args+=(--insecure)
else
    args+=(--root-certificates "$CA" --auth-supernode-private-key "$KEY")
fi
[ ${#APP_HASHES[@]} -eq 0 ] || args+=(--isolation process)  # its tasks run through fededit-superexec
export FLWR_HOME="$NODE_FLWR_HOME"  # where it installs the apps it runs
node_pid="$RUN_DIR/supernode-$NAME.pid"
node_log="$RUN_DIR/supernode-$NAME.log"
offset=$(stat -c %s "$node_log" 2>/dev/null || echo 0)  # the log is appended to: read this start's part
start_bg "$node_pid" "$node_log" "$(find_bin flower-supernode)" "${args[@]}"
exec_pid="$RUN_DIR/superexec-$NAME.pid"
if [ ${#APP_HASHES[@]} -gt 0 ]; then
    # the pinned node's SuperExec: it starts fededit-clientapp for every task, once the SuperNode's
    # Runtime API (loopback, --port) listens; it exits with the SuperNode (--parent-pid)
    (wait_for "flower-supernode $NAME" "$node_pid" "$node_log" 60 port_open 127.0.0.1 "$PORT") \
        || { stop_group "$worker_pid" "$node_pid"; exit 1; }
    exec_args=(--runtime-api-address "127.0.0.1:$PORT" --insecure --parent-pid "$(cat "$node_pid")")
    for hash in "${APP_HASHES[@]}"; do exec_args+=(--app-hash "$hash"); done
    start_bg "$exec_pid" "$RUN_DIR/superexec-$NAME.log" "$(find_bin fededit-superexec)" "${exec_args[@]}"
    info "SuperNode $NAME runs only app bundles ${APP_HASHES[*]} (fededit-superexec pid $(cat "$exec_pid"))"
fi
node_connected() { tail -c "+$((offset + 1))" "$node_log" | grep -q "SuperNode ID:"; }
deadline=$((SECONDS + ${SUPERNODE_CONNECT_TIMEOUT:-120}))
until node_connected; do
    if [ ${#APP_HASHES[@]} -gt 0 ] && ! pid_alive "$exec_pid"; then
        tail -n 20 "$RUN_DIR/superexec-$NAME.log" >&2 || true
        stop_group "$worker_pid" "$node_pid"
        die "fededit-superexec $NAME exited (log $RUN_DIR/superexec-$NAME.log)"
    fi
    if ! pid_alive "$node_pid"; then
        tail -c "+$((offset + 1))" "$node_log" | tail -n 20 >&2 || true
        stop_group "$worker_pid" "$node_pid" "$exec_pid"
        die "flower-supernode $NAME exited (log $node_log): is its key registered (register_node.sh)," \
            "and does the SuperLink's certificate name $SUPERLINK and come from $CA?"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        info "WARNING: SuperNode $NAME (pid $(cat "$node_pid")) has not reached the SuperLink at $SUPERLINK" \
            "yet; it keeps trying (log $node_log)"
        exit 0
    fi
    sleep 0.5
done
if [ ${#APP_HASHES[@]} -gt 0 ] && ! pid_alive "$exec_pid"; then
    tail -n 20 "$RUN_DIR/superexec-$NAME.log" >&2 || true
    stop_group "$worker_pid" "$node_pid"
    die "fededit-superexec $NAME exited (log $RUN_DIR/superexec-$NAME.log)"
fi
info "SuperNode $NAME (pid $(cat "$node_pid")) joined the SuperLink at $SUPERLINK; log $node_log"
