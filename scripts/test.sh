#!/usr/bin/env bash
# Runs Tessera's whole test suite (unit and integration tests) against real PostgreSQL
# and Redis, starting or installing them first when needed.
#   TESSERA_TEST_POSTGRES  base URL of the test server (default postgres://postgres:postgres@127.0.0.1:5432)
#   TESSERA_TEST_REDIS     Redis URL (default redis://127.0.0.1:6379)
# Extra arguments go to `cargo test` (e.g. scripts/test.sh refresh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

# Each test makes its own database; drop those left by earlier runs.
if command -v psql >/dev/null; then
  base=${TESSERA_TEST_POSTGRES:-postgres://postgres:postgres@127.0.0.1:5432}
  stale=$(psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'tessera\_test\_%'" 2>/dev/null || true)
  if [ -n "$stale" ]; then
    say "dropping $(echo "$stale" | wc -l) test databases from earlier runs"
    for db in $stale; do psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done
  fi
fi

# Queries are checked at compile time against the committed .sqlx/ data.
export SQLX_OFFLINE=true
say "building and running the test suite ..."
cargo test --workspace --tests "$@"
