# Shared helpers for the deploy/ scripts (sourced, not run).
# shellcheck shell=bash

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT_DIR="$(dirname "$DEPLOY_DIR")"
LOCAL_DIR="${FEDEDIT_DEPLOY_LOCAL:-$DEPLOY_DIR/local}"

# usage: print the script's leading comment block (its usage text)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
info() { echo "$(basename "$0"): $*" >&2; }

# abspath PATH: the absolute form of PATH (which need not exist yet).
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "${1#./}" ;;
    esac
}

# find_bin NAME: NAME on PATH, else beside the Python of the project's .venv.
find_bin() {
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    elif [ -x "$PROJECT_DIR/.venv/bin/$1" ]; then
        printf '%s\n' "$PROJECT_DIR/.venv/bin/$1"
    else
        die "$1 not found: activate the project's virtual environment (source .venv/bin/activate)"
    fi
}

# running PID: true when PID is a live process (a zombie is not)
running() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# pid_alive PIDFILE: true when PIDFILE names a running process.
pid_alive() {
    [ -s "$1" ] && running "$(cat "$1")"
}

# start_bg PIDFILE LOGFILE CMD...: start CMD in its own session (its PID leads its process group,
# so stop.sh can end it and the processes it spawns), write its PID to PIDFILE.
start_bg() {
    local pidfile="$1" logfile="$2"
    shift 2
    if pid_alive "$pidfile"; then
        die "$pidfile names a running process ($(cat "$pidfile")): stop it first (deploy/stop.sh)"
    fi
    mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
    setsid "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# wait_for DESCRIPTION PIDFILE LOGFILE SECONDS CMD...: poll CMD until it succeeds; fail when the
# process of PIDFILE exits or SECONDS pass (the log's tail is shown).
wait_for() {
    local what="$1" pidfile="$2" logfile="$3" seconds="$4"
    shift 4
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ! pid_alive "$pidfile"; then
            tail -n 20 "$logfile" >&2 || true
            die "$what exited before it was ready (log: $logfile)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$logfile" >&2 || true
            die "$what not ready after ${seconds}s (log: $logfile)"
        fi
        sleep 0.5
    done
}

# signal_all SIGNAL PID...: each PID's process group, or the PID alone when it leads none
signal_all() {
    local sig="$1" pid
    shift
    for pid in "$@"; do
        kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    done
}

# stop_group PIDFILE...: stop these processes together: SIGTERM to each one's process group,
# SIGKILL after STOP_TIMEOUT seconds (default 20); the PID files are removed
stop_group() {
    local pidfile pid pids=()
    for pidfile in "$@"; do
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        rm -f "$pidfile"
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        if ! running "$pid"; then  # gone: end what is left of its process group
            if ps -o args= -g "$pid" 2>/dev/null | grep -qE 'flower-|flwr|fededit'; then signal_all KILL "$pid"; fi
            continue
        fi
        if ! ps -o args= -p "$pid" | grep -qE 'flower-|flwr|fededit'; then
            info "$pidfile: pid $pid is not a Flower or fededit process (stale PID file): left alone"
            continue
        fi
        info "stopping $(basename "$pidfile" .pid) (pid $pid)"
        pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    signal_all TERM "${pids[@]}"
    local deadline=$((SECONDS + ${STOP_TIMEOUT:-20})) alive
    while :; do
        alive=()
        for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            info "still running after ${STOP_TIMEOUT:-20}s, SIGKILL: ${alive[*]}"
            break
        fi
        sleep 0.2
    done
    signal_all KILL "${pids[@]}"  # whatever is left of the groups
}

# port_open HOST PORT: true when something listens on HOST:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# write_connection FLWR_HOME NAME ADDRESS CA_CERT|--insecure: add (or replace) the SuperLink
# connection NAME in FLWR_HOME/config.toml and make it the default when there is none.
write_connection() {
    local home="$1" name="$2" address="$3" ca="$4"
    mkdir -p "$home"
    "$(find_bin python)" - "$home/config.toml" "$name" "$address" "$ca" <<'PY'
import re, sys
from pathlib import Path

path, name, address, ca = Path(sys.argv[1]), *sys.argv[2:]
text = path.read_text() if path.exists() else ""
# drop an earlier section of this connection (up to the next section header)
text = re.sub(rf"(?ms)^\[superlink\.{re.escape(name)}\]\n.*?(?=^\[|\Z)", "", text).rstrip() + "\n"
if not re.search(r"(?m)^\[superlink\]", text):
    text = f'[superlink]\ndefault = "{name}"\n' + text
tls = "insecure = true" if ca == "--insecure" else f'root-certificates = "{Path(ca).resolve()}"'
text = text.rstrip() + f'\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n'
path.write_text(text.lstrip())
PY
}
