#!/usr/bin/env bash
# Runs Tessera's whole test suite: the JavaScript client's unit tests (node --test), then
# the Rust unit and integration tests against real PostgreSQL and Redis, found or
# provided by scripts/services.sh (which changes nothing the machine already has), with
# the demo SPA in headless Chromium (tests/api/browser.rs), then the HTTP suite again on
# the embedded default (SQLite, revocations in process).
#   TESSERA_TEST_POSTGRES  base URL of the test server (no database name)
#   TESSERA_TEST_REDIS     Redis URL
# Extra arguments go to `cargo test` (e.g. scripts/test.sh refresh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
ensure_browser_tools
ensure_mail_tools
ensure_schemathesis
# The contract run (tests/api/schemathesis.rs) fails rather than skips without it.
export TESSERA_TEST_SCHEMATHESIS="$DEV_DIR/schemathesis/bin/schemathesis"
export TESSERA_TEST_SCHEMATHESIS_REQUIRED=1
# The browser tests (tests/api/browser.rs) fail rather than skip when a tool is missing.
export TESSERA_TEST_BROWSER=required

# Each test makes its own database (tessera_test_<run>_*) and keys directory, named
# after this run, so two runs at once never touch each other's. A run removes its own
# when it succeeds (a failed one keeps them for inspection), and those of earlier runs
# whose process is gone.
export TESSERA_TEST_RUN="r$$"
source scripts/test-databases.sh
drop_test_databases stale

say "testing the JavaScript client (node --test clients/js/test/*.test.js) ..."
node --test clients/js/test/*.test.js

# Queries are checked at compile time against the committed .sqlx/ data.
export SQLX_OFFLINE=true
say "building and running the test suite (PostgreSQL + Redis) ..."
cargo test --workspace --tests "$@"
# The same HTTP suite on the embedded configuration: SQLite, with revocation marks and
# login failure budgets in process (redis.url empty); the tests about PostgreSQL or
# Redis themselves or about several instances end early there.
say "running the HTTP suite again on the embedded configuration (SQLite) ..."
TESSERA_TEST_BACKEND=embedded cargo test --test api "$@"
drop_test_databases own
