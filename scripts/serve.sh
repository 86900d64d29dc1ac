#!/usr/bin/env bash
# Builds and starts Tessera on its zero-config default (http://127.0.0.1:8080): the
# embedded database in ./data/tessera.db and revocations kept in process. No other
# service is needed. Arguments go to `tessera` (e.g. --config F); TESSERA__* variables
# override any setting (see config/default.toml), e.g. TESSERA__DATABASE__URL and
# TESSERA__REDIS__URL for PostgreSQL + Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
export SQLX_OFFLINE=true
printf '==> %s\n' "building and starting tessera ..." >&2
exec cargo run --release --bin tessera -- "$@"
