#!/usr/bin/env bash
# Starts Tessera on its zero-config defaults (http://127.0.0.1:8080), after making sure
# a PostgreSQL and a Redis are there (scripts/services.sh: the machine's own as they
# are, or the project's own). Arguments go to `tessera` (e.g. --config F).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
# The services found or provided, unless the caller chose others.
export TESSERA__DATABASE__URL=${TESSERA__DATABASE__URL:-$TESSERA_TEST_POSTGRES/tessera}
export TESSERA__REDIS__URL=${TESSERA__REDIS__URL:-$TESSERA_TEST_REDIS}
export SQLX_OFFLINE=true
say "building and starting tessera ..."
exec cargo run --release --bin tessera -- "$@"
