#!/usr/bin/env bash
# A real S3 server on loopback for the remote-registry tests and the README's worked example:
# moto's server (PyPI `moto[server]`) in a virtual environment this script makes on first use.
#
#   scripts/s3-server.sh PORT [WATCH_PID]
#
# Serves http://127.0.0.1:PORT until killed, or, with WATCH_PID, until that process exits (the
# tests pass their own pid, so no server outlives them). Buckets are made with a plain
# `PUT /bucket`; any access key is accepted. The environment is kept in $MMX_MOTO_VENV
# (default target/moto-venv).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${1:?usage: scripts/s3-server.sh PORT [WATCH_PID]}
WATCH=${2:-}
VENV=${MMX_MOTO_VENV:-$ROOT/target/moto-venv}

mkdir -p "$(dirname "$VENV")"
# One installer at a time: test binaries may start servers concurrently.
exec 9>"$VENV.lock"
flock 9
if [ ! -x "$VENV/bin/moto_server" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "moto[server]>=5.1,<6"
fi
flock -u 9

"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT INT TERM
if [ -n "$WATCH" ]; then
    while kill -0 "$WATCH" 2>/dev/null && kill -0 "$server" 2>/dev/null; do sleep 1; done
else
    wait "$server"
fi
