#!/usr/bin/env bash
# Finds (or provides) a PostgreSQL and a Redis for Tessera's tests and its server
# configuration, without ever changing what the machine already has: no existing role,
# password, database or service configuration is touched.
#
# PostgreSQL, first that works:
#   1. TESSERA_TEST_POSTGRES (a base URL without database name), if set;
#   2. the local server on 127.0.0.1:5432 as it is, if role postgres logs in over TCP
#      (trust, or the password postgres);
#   3. a dedicated role tessera_dev (LOGIN CREATEDB) with a generated password kept in
#      .dev/postgres-password, created once through the postgres OS account (root or
#      sudo needed then). An existing tessera_dev whose password is not ours is an error.
#   PostgreSQL is installed with apt-get, or started, when it is absent or stopped.
# Redis, first that works:
#   1. TESSERA_TEST_REDIS, if set;
#   2. the local server on 127.0.0.1:6379 as it is;
#   3. a Redis of the project's own on 127.0.0.1:6390 (loopback only) with a generated
#      password in .dev/redis-password, data in .dev/redis (installed with apt-get if
#      needed).
# ensure_browser_tools installs what the browser tests need (chromium, chromium-driver,
# nodejs) when missing; ensure_mail_tools the email tests' SMTP server (Debian's
# python3-aiosmtpd, for /usr/bin/python3).
# Exports TESSERA_TEST_POSTGRES and TESSERA_TEST_REDIS for what it chose. Sourced by
# scripts/test.sh and scripts/serve.sh; also runnable on its own.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=${TESSERA_PG_PORT:-5432}
REDIS_PORT=${TESSERA_REDIS_PORT:-6379}
OWN_REDIS_PORT=${TESSERA_OWN_REDIS_PORT:-6390}
DEV_DIR=${TESSERA_DEV_DIR:-$(pwd)/.dev}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@";
  elif command -v sudo >/dev/null; then sudo "$@";
  else die "need root (or sudo) to run: $*"; fi
}

apt_install() {
  command -v apt-get >/dev/null || die "$* is not installed and apt-get is not available; install it by hand"
  say "installing $* with apt-get (this takes a minute) ..."
  if [ -z "${TESSERA_APT_UPDATED:-}" ]; then
    as_root apt-get update -qq
    export TESSERA_APT_UPDATED=1
  fi
  # shellcheck disable=SC2086 # the options are words
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${TESSERA_APT_OPTIONS:-} "$@" >/dev/null
}

# A secret of 32 hex digits, made once and kept (mode 0600) in $DEV_DIR/$1.
dev_secret() {
  local file="$DEV_DIR/$1"
  if [ ! -s "$file" ]; then
    mkdir -p "$DEV_DIR" && chmod 700 "$DEV_DIR"
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$file")
  fi
  cat "$file"
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 60); do
    if "$@"; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within 30 s"
}

pg_up() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

# Whether the base URL $1 logs in (psql needed to tell; without it, assume so).
pg_login() {
  command -v psql >/dev/null || return 0
  psql "$1/postgres" -tAc 'SELECT 1' >/dev/null 2>&1
}

# As the postgres OS account, over the local socket (peer authentication).
as_postgres_psql() {
  as_root su postgres -c "psql -q -X -p $PG_PORT -v ON_ERROR_STOP=1 -tA $*"
}

ensure_postgres() {
  if [ -n "${TESSERA_TEST_POSTGRES:-}" ]; then
    say "PostgreSQL: using TESSERA_TEST_POSTGRES"
    return
  fi
  if ! pg_up; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version ..."
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL pg_up
  fi
  local base="postgres://postgres:postgres@$PG_HOST:$PG_PORT"
  if pg_login "$base"; then
    say "PostgreSQL: using role postgres on $PG_HOST:$PG_PORT as it is"
    export TESSERA_TEST_POSTGRES=$base
    return
  fi
  local password
  password=$(dev_secret postgres-password)
  base="postgres://tessera_dev:$password@$PG_HOST:$PG_PORT"
  if ! pg_login "$base"; then
    id postgres >/dev/null 2>&1 ||
      die "cannot log in to PostgreSQL on $PG_HOST:$PG_PORT; set TESSERA_TEST_POSTGRES to a base URL of a role that may create databases"
    local exists
    exists=$(as_postgres_psql "-c \"SELECT 1 FROM pg_roles WHERE rolname = 'tessera_dev'\"") ||
      die "cannot reach PostgreSQL as the postgres OS account; set TESSERA_TEST_POSTGRES"
    if [ -n "$exists" ]; then
      die "role tessera_dev exists but does not accept the password in $DEV_DIR/postgres-password; it is left as it is: drop it yourself, or set TESSERA_TEST_POSTGRES"
    fi
    say "creating the dedicated PostgreSQL role tessera_dev (password in $DEV_DIR/postgres-password)"
    as_postgres_psql "-c \"CREATE ROLE tessera_dev LOGIN CREATEDB PASSWORD '$password'\"" >/dev/null
    pg_login "$base" ||
      die "role tessera_dev was created but cannot log in over TCP on $PG_HOST:$PG_PORT (pg_hba.conf?); set TESSERA_TEST_POSTGRES"
  fi
  say "PostgreSQL: using role tessera_dev on $PG_HOST:$PG_PORT"
  export TESSERA_TEST_POSTGRES=$base
}

redis_ping() { # port [password]
  if command -v redis-cli >/dev/null; then
    [ "$(REDISCLI_AUTH=${2:-} redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

ensure_redis() {
  if [ -n "${TESSERA_TEST_REDIS:-}" ]; then
    say "Redis: using TESSERA_TEST_REDIS"
    return
  fi
  if redis_ping "$REDIS_PORT"; then
    say "Redis: using the one on 127.0.0.1:$REDIS_PORT as it is"
    export TESSERA_TEST_REDIS="redis://127.0.0.1:$REDIS_PORT"
    return
  fi
  local password
  password=$(dev_secret redis-password)
  if ! redis_ping "$OWN_REDIS_PORT" "$password"; then
    command -v redis-server >/dev/null || apt_install redis-server
    say "starting the project's own Redis on 127.0.0.1:$OWN_REDIS_PORT (password in $DEV_DIR/redis-password) ..."
    mkdir -p "$DEV_DIR/redis"
    printf 'requirepass %s\n' "$password" | redis-server - --daemonize yes \
      --bind 127.0.0.1 --port "$OWN_REDIS_PORT" --protected-mode yes \
      --save "" --appendonly no --dir "$DEV_DIR/redis" --logfile "$DEV_DIR/redis/redis.log"
    wait_for Redis redis_ping "$OWN_REDIS_PORT" "$password"
  fi
  say "Redis: using the project's own on 127.0.0.1:$OWN_REDIS_PORT"
  export TESSERA_TEST_REDIS="redis://:$password@127.0.0.1:$OWN_REDIS_PORT"
}

# The browser tests' tools: headless Chromium and its WebDriver from Debian's packages
# (never a browser download), and Node.js for the JavaScript client's tests and the
# demo's static server. Installed with apt-get when missing.
ensure_browser_tools() {
  local missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  command -v node >/dev/null || missing+=(nodejs)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
}

ensure_mail_tools() {
  if ! /usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null; then
    TESSERA_APT_OPTIONS=--no-install-recommends apt_install python3-aiosmtpd
  fi
}

# The TLS tests (tests/api/tls.rs) start a throwaway PostgreSQL cluster of their own
# (initdb on a free port, as the postgres OS account when run as root) and a
# redis-server with a TLS port: they need PostgreSQL's server programs and redis-server
# even when TESSERA_TEST_POSTGRES / TESSERA_TEST_REDIS point elsewhere.
ensure_tls_tools() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
  command -v redis-server >/dev/null || apt_install redis-server
}

# The contract run (tests/api/schemathesis.rs): schemathesis from PyPI, at a pinned
# version, in a virtualenv of the project's own (.dev/schemathesis); nothing is
# installed into the machine's Python.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="$DEV_DIR/schemathesis"
  if [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    return
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    TESSERA_APT_OPTIONS=--no-install-recommends apt_install python3-venv
  fi
  say "installing schemathesis $SCHEMATHESIS_VERSION into $venv (pip, from PyPI) ..."
  rm -rf "$venv"
  python3 -m venv "$venv" || die "cannot make a Python virtualenv in $venv"
  "$venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" ||
    die "cannot install schemathesis from PyPI; is the network up?"
}

ensure_services() {
  ensure_postgres
  ensure_redis
  ensure_tls_tools
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_services
fi
