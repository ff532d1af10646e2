#!/usr/bin/env bash
# Usage: deploy/app_hash.sh [APP_DIR]
#
# Prints the sha256 of the app bundle (.fab) that `flwr run APP_DIR` would upload (default: this
# project). `flwr build` packs the same files with fixed timestamps, so the same files give the same
# hash: build it from the agreed commit, without local changes or untracked files that .gitignore
# does not exclude (they are packed too), and give the hash to start_node.sh --app-hash.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
APP="$(abspath "${1:-$PROJECT_DIR}")"
[ -f "$APP/pyproject.toml" ] || die "$APP: no pyproject.toml"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
(cd "$out" && "$(find_bin flwr)" build --app "$APP" >/dev/null) || die "flwr build --app $APP failed"
fab=("$out"/*.fab)
[ -f "${fab[0]}" ] || die "flwr build wrote no .fab"
sha256sum "${fab[0]}" | cut -d' ' -f1
