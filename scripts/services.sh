#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on their default local ports: uses them if they
# are running, starts them if they are installed but stopped, installs them with apt-get
# if they are absent. Sourced by scripts/test.sh and scripts/serve.sh; also runnable.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

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
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

redis_up() {
  if command -v redis-cli >/dev/null; then
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null
  fi
}

wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 60); do
    if $check; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within 30 s"
}

ensure_postgres() {
  if pg_up; then
    say "PostgreSQL is running on $PG_HOST:$PG_PORT"
  else
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version ..."
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL pg_up
  fi
  # Tessera's default URL uses postgres:postgres over TCP. A fresh Debian install asks
  # for a password the postgres role does not have yet: give it the documented one.
  if command -v psql >/dev/null && ! PGPASSWORD=postgres psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
    if id postgres >/dev/null 2>&1; then
      say "setting the local development password of role postgres"
      as_root su postgres -c "psql -q -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
    else
      die "cannot log in to PostgreSQL as postgres:postgres; set TESSERA__DATABASE__URL"
    fi
  fi
}

ensure_redis() {
  if redis_up; then
    say "Redis is running on 127.0.0.1:$REDIS_PORT"
    return
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis ..."
  local dir=/var/lib/redis
  [ -w "$dir" ] || dir=$(mktemp -d)
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir "$dir" --logfile "$dir/tessera-redis.log"
  wait_for Redis redis_up
}

ensure_services() {
  ensure_postgres
  ensure_redis
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_services
fi
