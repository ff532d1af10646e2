#!/usr/bin/env bash
# Usage: deploy/make_node_key.sh [OUT_DIR] NAME
#
# Makes an ECDSA P-384 key pair for one SuperNode: OUT_DIR/NAME (private: stays on the node's
# machine, passed to start_node.sh) and OUT_DIR/NAME.pub (public: sent to the SuperLink operator,
# who registers it with register_node.sh). OUT_DIR defaults to deploy/local/keys.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ $# -eq 1 ]; then OUT_DIR="$LOCAL_DIR/keys"; NAME="$1"
elif [ $# -eq 2 ]; then OUT_DIR="$1"; NAME="$2"
else usage >&2; exit 2
fi
command -v ssh-keygen >/dev/null || die "ssh-keygen not found (package openssh-client)"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME may hold letters, digits, '.', '_' and '-' only"
mkdir -p "$OUT_DIR"
[ -e "$OUT_DIR/$NAME" ] && die "$OUT_DIR/$NAME exists: remove it first to make a new key"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fededit-$NAME" -f "$OUT_DIR/$NAME"
chmod 600 "$OUT_DIR/$NAME"
info "private key: $OUT_DIR/$NAME (stays on the node), public key: $OUT_DIR/$NAME.pub (to the SuperLink operator)"
