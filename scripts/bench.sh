#!/usr/bin/env bash
# Benchmarks Tessera against the limits of this machine (see docs/performance.md):
# builds release, starts a server on a fresh database with fresh keys, seeds users, runs
# every scenario and ceiling with tessera-bench, prints one markdown table and writes it
# to $BENCH_OUT (default target/bench/report.md).
#
#   BENCH_BACKEND      postgres (default: PostgreSQL + Redis) or sqlite (the embedded
#                      default: SQLite, revocations in process; the two-instance "pair"
#                      check is left out, since the mode is one instance)
#   BENCH_SECS         seconds per scenario and ceiling (default 10)
#   BENCH_CONNECTIONS  connections of the closed-loop scenarios (default 32)
#   BENCH_ARGS         more tessera-bench suite flags (see `tessera-bench suite --help`)
#   BENCH_HOLD=1       start the servers, print how to run the suite by hand, and wait
#                      (for profiling one scenario with --only)
#   TESSERA__*         settings of the server under test, as for `tessera serve`
#                      (e.g. TESSERA__TOKENS__ALGORITHM=EdDSA); the suite reads the same
#                      ones for its ceilings (argon2 parameters, signing algorithm).
#
# Login throttling is raised for the run (every request comes from 127.0.0.1, and the
# point is to reach the argon2 pool); everything else is the default configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

PORT=${BENCH_PORT:-18080}
SETUP_PORT=${BENCH_SETUP_PORT:-18081}
OUT=${BENCH_OUT:-target/bench/report.md}
DB=tessera_bench
# The PostgreSQL and Redis that scripts/services.sh found or provided.
PG_BASE=${TESSERA_BENCH_POSTGRES:-$TESSERA_TEST_POSTGRES}
export TESSERA__REDIS__URL=${TESSERA__REDIS__URL:-$TESSERA_TEST_REDIS}
work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-bench.XXXXXX")
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for port in "$PORT" "$SETUP_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use; set BENCH_PORT / BENCH_SETUP_PORT to free ports"
  fi
done

export SQLX_OFFLINE=true
say "building tessera and tessera-bench (release; a few minutes the first time) ..."
cargo build --release --quiet -p tessera -p tessera-bench

BACKEND=${BENCH_BACKEND:-postgres}
# The setup instance (below) logs sessions in beside the server under test. On SQLite
# the server keeps revocations in process and so holds the data directory alone; the
# setup instance is given Redis instead (it never revokes anything), which lets it share
# the file.
SETUP_REDIS=$TESSERA__REDIS__URL
case $BACKEND in
  postgres)
    say "fresh database $DB and keys in $work/keys"
    if command -v psql >/dev/null; then
      psql -q "$PG_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    fi
    export TESSERA__DATABASE__URL="$PG_BASE/$DB"
    ;;
  sqlite)
    say "fresh SQLite database in $work/data and keys in $work/keys"
    export TESSERA__DATABASE__URL="sqlite://$work/data/tessera.db"
    export TESSERA__REDIS__URL=""
    case " ${BENCH_ARGS:-} " in
      *" --only "*) ;;
      *) BENCH_ARGS="${BENCH_ARGS:-} --only ceilings,empty,login,refresh,me,logout,mixed,flood" ;;
    esac
    ;;
  *) die "BENCH_BACKEND must be postgres or sqlite" ;;
esac
secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export TESSERA__KEYS__DIR="$work/keys"
export TESSERA__REDIS__KEY_PREFIX="tessera-bench-$$:"
export TESSERA__LOG__LEVEL=${TESSERA__LOG__LEVEL:-warn}
export TESSERA__LOGIN__PER_IP_PER_MINUTE=1000000000
export TESSERA__LOGIN__PER_ACCOUNT_PER_MINUTE=1000000000
export TESSERA__LOGIN__FREE_FAILURES=1000000000
export TESSERA__INTROSPECTION__CLIENTS="bench:$secret"

ready() {
  # GET /health/ready with bash alone (curl may not be installed).
  local status
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /health/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  read -r _ status _ <&3 || true
  exec 3>&-
  [ "$status" = 200 ]
}

wait_ready() {
  local port=$1 pid=$2
  for _ in $(seq 1 120); do
    kill -0 "$pid" 2>/dev/null || die "the server on port $port exited; see $work/server-$port.log"
    if ready "$port" 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  die "the server on port $port was not ready within 60 s; see $work/server-$port.log"
}

say "starting the server under test on 127.0.0.1:$PORT"
# With its metrics listener on (as by default), on a free port of its own.
TESSERA__SERVER__PORT=$PORT TESSERA__METRICS__LISTEN=${TESSERA__METRICS__LISTEN:-127.0.0.1:0} \
  target/release/tessera serve >"$work/server-$PORT.log" 2>&1 &
server=$!
pids+=("$server")
wait_ready "$PORT" "$server"

# Same database, keys and Redis; cheap argon2 so that logging in the thousands of
# sessions that the refresh, /me, /introspect and logout scenarios use takes seconds.
# Its users are not the login scenarios' users, so no hash is ever rehashed.
say "starting the setup instance on 127.0.0.1:$SETUP_PORT (cheap argon2, for seeding sessions only)"
TESSERA__SERVER__PORT=$SETUP_PORT TESSERA__PASSWORD__MEMORY_KIB=8 TESSERA__PASSWORD__ITERATIONS=1 \
  TESSERA__PASSWORD__ALLOW_WEAK=true TESSERA__DATABASE__AUTO_MIGRATE=false \
  TESSERA__REDIS__URL=$SETUP_REDIS TESSERA__METRICS__LISTEN= \
  target/release/tessera serve >"$work/server-$SETUP_PORT.log" 2>&1 &
pids+=("$!")
wait_ready "$SETUP_PORT" "$!"

if [ -n "${BENCH_HOLD:-}" ]; then
  # For profiling: keep both servers up and wait. The suite's in-process ceilings
  # (the bare refresh transaction) need the same settings, so write them out.
  env | grep '^TESSERA__' | sed "s/^\([^=]*\)=\(.*\)$/export \1='\2'/" >"$work/bench.env"
  say "holding: server pid $server on 127.0.0.1:$PORT, setup instance on 127.0.0.1:$SETUP_PORT;"
  say "  run: source $work/bench.env && target/release/tessera-bench suite --addr 127.0.0.1:$PORT --setup-addr 127.0.0.1:$SETUP_PORT --server-pid $server --introspect-client bench:$secret --only ..."
  say "  Ctrl-C stops"
  wait "$server"
  exit 0
fi

mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2086
target/release/tessera-bench suite \
  --addr "127.0.0.1:$PORT" --setup-addr "127.0.0.1:$SETUP_PORT" --server-pid "$server" \
  --introspect-client "bench:$secret" \
  --secs "${BENCH_SECS:-10}" --connections "${BENCH_CONNECTIONS:-32}" \
  --out "$OUT" ${BENCH_ARGS:-}

if [ "$BACKEND" = postgres ] && command -v psql >/dev/null; then
  psql -q "$PG_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
fi
