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

# Each test makes its own database (tessera_test_*) and keys directory. Remove them
# before the run (left by an interrupted or failed run, kept for inspection) and after
# a successful one.
base=${TESSERA_TEST_POSTGRES:-postgres://postgres:postgres@127.0.0.1:5432}
drop_test_databases() {
  rm -rf "${TMPDIR:-/tmp}"/tessera-test-keys-*
  command -v psql >/dev/null || return 0
  local stale
  stale=$(psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'tessera\_test\_%'" 2>/dev/null || true)
  [ -n "$stale" ] || return 0
  [ "${1:-}" = quiet ] || say "dropping $(echo "$stale" | wc -l) test databases"
  for db in $stale; do echo "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE);"; done |
    psql -q "$base/postgres" >/dev/null 2>&1 || true
}
drop_test_databases

# Queries are checked at compile time against the committed .sqlx/ data.
export SQLX_OFFLINE=true
say "building and running the test suite ..."
cargo test --workspace --tests "$@"
drop_test_databases quiet
