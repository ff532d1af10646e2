#!/usr/bin/env bash
# Usage: deploy/stop.sh [DIR...]
#
# Stops every process named by a *.pid file in each DIR (default deploy/local/run): SuperNodes
# first, then their SuperExecs (nodes with --app-hash), then edit workers, then the rest (the
# SuperLink). Each gets SIGTERM, sent to the process group it leads (the start_*.sh scripts start
# each in its own session, so this also ends the SuperExec, ServerApp and ClientApp processes it
# spawned), and SIGKILL after STOP_TIMEOUT seconds (default 20). A PID file naming a process that
# is not Flower's or fededit's (a stale file whose PID was reused) is removed without signalling
# anything. PID files are removed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -eq 0 ] && set -- "$LOCAL_DIR/run"
shopt -s nullglob
for dir in "$@"; do
    [ -d "$dir" ] || { info "$dir: no such folder"; continue; }
    for pattern in 'supernode*.pid' 'superexec*.pid' 'worker*.pid' '*.pid'; do
        files=("$dir"/$pattern)
        [ ${#files[@]} -gt 0 ] && stop_group "${files[@]}"
    done
done
exit 0
