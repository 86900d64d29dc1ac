#!/usr/bin/env bash
# Starts Tessera on its zero-config defaults (http://127.0.0.1:8080), after making sure
# PostgreSQL and Redis are running locally. Arguments go to `tessera` (e.g. --config F).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
export SQLX_OFFLINE=true
say "building and starting tessera ..."
exec cargo run --release --bin tessera -- "$@"
