#!/usr/bin/env bash
# Regenerates .sqlx/, the offline query data that lets every build (CI's too) check the
# SQL of both stores at compile time without a database. Run it after changing a query
# or a migration, and commit .sqlx/.
#
# sqlx's macros check online against the one DATABASE_URL of a build, and offline pick
# each query's driver from its cached file (named by a hash of the statement's text), so
# one .sqlx/ holds both backends' queries. Hence two online passes, one per backend,
# then an offline build that must succeed with .sqlx/ alone. SQLite statements use
# SQLite's ?N placeholders, so their texts differ from PostgreSQL's $N ones.
#
# Needs a PostgreSQL (scripts/services.sh finds or provides one) and python3 (for the
# SQLite schema); touches nothing but scratch databases it creates and drops.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
pg_db="tessera_prepare_$$"
pg_url="$TESSERA_TEST_POSTGRES/$pg_db"

say "scratch SQLite database with migrations/sqlite/ ..."
python3 - "$scratch/prepare.db" migrations/sqlite/*.sql <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for f in sorted(sys.argv[2:]):
    db.executescript(open(f).read())
db.commit()
PY

say "scratch PostgreSQL database $pg_db with migrations/postgres/ ..."
psql_admin() { psql "$TESSERA_TEST_POSTGRES/postgres" -v ON_ERROR_STOP=1 -q "$@"; }
psql_admin -c "CREATE DATABASE \"$pg_db\""
trap 'rm -rf "$scratch"; psql_admin -c "DROP DATABASE IF EXISTS \"$pg_db\"" || true' EXIT
for f in migrations/postgres/*.sql; do
    psql "$pg_url" -v ON_ERROR_STOP=1 -q -f "$f"
done

# One pass per backend, each compiling only that backend's module (TESSERA_PREPARE, read
# by build.rs, leaves the other out, so the crate itself does not build in a pass:
# expected, and ignored). Each
# pass writes its own directory; the two are merged, and a statement that both
# backends use with the very same text (one cache file for two drivers) is an error.
for backend in sqlite postgres; do
    case $backend in
        sqlite) url="sqlite://$scratch/prepare.db" ;;
        postgres) url=$pg_url ;;
    esac
    say "online pass against $backend ..."
    mkdir -p "$scratch/$backend"
    touch src/store/sqlite/mod.rs src/store/postgres/mod.rs
    DATABASE_URL=$url SQLX_OFFLINE=false SQLX_OFFLINE_DIR=$scratch/$backend TESSERA_PREPARE=$backend \
        cargo build --lib --quiet 2>"$scratch/$backend.log" || true
    if grep -q "error returned from database" "$scratch/$backend.log"; then
        grep -B2 -A8 "error returned from database" "$scratch/$backend.log" >&2
        say "a $backend query does not check; fix it and run again"
        exit 1
    fi
done
clash=$(comm -12 <(ls "$scratch/sqlite") <(ls "$scratch/postgres"))
if [ -n "$clash" ]; then
    for f in $clash; do python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["query"])' "$scratch/sqlite/$f" >&2; done
    say "these statements have the same text in both stores; make them differ"
    exit 1
fi
rm -rf .sqlx && mkdir .sqlx
cp "$scratch"/sqlite/*.json "$scratch"/postgres/*.json .sqlx/

say "offline check with .sqlx/ alone ..."
touch src/store/sqlite/mod.rs src/store/postgres/mod.rs
SQLX_OFFLINE=true cargo build --lib
say "$(ls .sqlx | wc -l) queries in .sqlx/"
