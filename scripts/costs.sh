#!/usr/bin/env bash
# Measures what each operation costs the backing services, for docs/scaling.md: rows,
# table bytes (with indexes) and WAL written in PostgreSQL, and Redis commands and
# bytes, per login, refresh, GET /me and logout. Starts a release server on a fresh
# database (tessera_costs) and Redis prefix, runs COSTS_N of each operation one at a
# time through HTTP, and prints one markdown table.
#
#   COSTS_N     operations of each kind (default 200; fewer leave table bytes dominated
#               by the 8 KiB page granularity)
#   COSTS_PORT  the server's port (default 18090)
#
# WAL is the cluster's (pg_current_wal_lsn), so run it on an otherwise idle server; the
# argon2 parameters are cheap (they cost CPU, not storage).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

N=${COSTS_N:-200}
PORT=${COSTS_PORT:-18090}
DB=tessera_costs
work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-costs.XXXXXX")
server=
cleanup() {
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "${COSTS_KEEP:-}" ] || cp "$work/server.log" /tmp/costs-server.log
  rm -rf "$work"
}
trap cleanup EXIT

command -v psql >/dev/null || die "psql is needed (postgresql-client)"
command -v redis-cli >/dev/null || die "redis-cli is needed (redis-tools)"
export SQLX_OFFLINE=true
say "building tessera (release) ..."
cargo build --release --quiet -p tessera

psql -q "$TESSERA_TEST_POSTGRES/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
prefix="tessera-costs-$$:"
export TESSERA__DATABASE__URL="$TESSERA_TEST_POSTGRES/$DB"
export TESSERA__REDIS__URL="$TESSERA_TEST_REDIS"
export TESSERA__REDIS__KEY_PREFIX="$prefix"
export TESSERA__KEYS__DIR="$work/keys"
export TESSERA__SERVER__PORT="$PORT"
export TESSERA__PASSWORD__MEMORY_KIB=256 TESSERA__PASSWORD__ITERATIONS=1 TESSERA__PASSWORD__ALLOW_WEAK=true
export TESSERA__LOGIN__PER_IP_PER_MINUTE=1000000000 TESSERA__LOGIN__PER_ACCOUNT_PER_MINUTE=1000000000
export TESSERA__LOGIN__FREE_FAILURES=1000000000
export TESSERA__LOG__LEVEL=warn
target/release/tessera serve >"$work/server.log" 2>&1 &
server=$!
base="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
  curl -sf "$base/health/ready" >/dev/null && break
  sleep 0.2
done
curl -sf "$base/health/ready" >/dev/null || die "the server did not start: $(tail -5 "$work/server.log")"

q() { psql "$TESSERA__DATABASE__URL" -tAqc "$1"; }
redis() { redis-cli -u "$TESSERA_TEST_REDIS" --no-auth-warning "$@"; }
# One line: WAL position, rows and total bytes of the four tables, Redis calls and bytes.
snapshot() {
  local pg calls net
  pg=$(q "SELECT pg_current_wal_lsn() || ' ' ||
              (SELECT count(*) FROM sessions) || ' ' || (SELECT count(*) FROM refresh_tokens) || ' ' ||
              (SELECT count(*) FROM audit_events) || ' ' || (SELECT count(*) FROM devices) || ' ' ||
              pg_total_relation_size('sessions') + pg_total_relation_size('refresh_tokens') +
              pg_total_relation_size('audit_events') + pg_total_relation_size('devices')")
  calls=$(redis info commandstats | sed -n 's/^cmdstat_[^:]*:calls=\([0-9]*\),.*/\1/p' | awk '{s+=$1} END {print s+0}')
  net=$(redis info stats | tr -d '\r' | awk -F: '/^total_net_(input|output)_bytes/ {s+=$2} END {print s+0}')
  echo "$pg $calls $net"
}
# Per operation: WAL bytes, rows (sessions, tokens, audit, devices), bytes, Redis calls, Redis bytes.
row() { # name before after
  read -r l1 s1 t1 a1 d1 b1 c1 n1 <<<"$2"
  read -r l2 s2 t2 a2 d2 b2 c2 n2 <<<"$3"
  local wal
  wal=$(q "SELECT pg_wal_lsn_diff('$l2', '$l1')")
  awk -v n="$N" -v name="$1" -v wal="$wal" -v s=$((s2 - s1)) -v t=$((t2 - t1)) -v a=$((a2 - a1)) \
      -v d=$((d2 - d1)) -v b=$((b2 - b1)) -v c=$((c2 - c1)) -v net=$((n2 - n1)) 'BEGIN {
    printf "| %s | %.0f | %.2f / %.2f / %.2f / %.2f | %.0f | %.1f | %.0f |\n",
      name, wal / n, s / n, t / n, a / n, d / n, b / n, c / n, net / n }'
}
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

curl -sf -X POST "$base/users" -H 'content-type: application/json' \
  -d '{"email":"costs@example.com","password":"correct horse battery"}' >/dev/null
say "measuring $N of each operation ..."
login='{"email":"costs@example.com","password":"correct horse battery"}'

before=$(snapshot)
: >"$work/access"
for _ in $(seq 1 "$N"); do
  echo "$(curl -sf -X POST "$base/login" -H 'content-type: application/json' -d "$login" |
    json_field access_token)" >>"$work/access"
done
after_login=$(snapshot)
live_bytes=$(q "SELECT (pg_total_relation_size('sessions') + pg_total_relation_size('refresh_tokens'))
                       / greatest((SELECT count(*) FROM sessions), 1)")

refresh=$(curl -sf -X POST "$base/login" -H 'content-type: application/json' -d "$login" | json_field refresh_token)
before_refresh=$(snapshot)
for _ in $(seq 1 "$N"); do
  refresh=$(curl -sf -X POST "$base/refresh" -H 'content-type: application/json' \
    -d "{\"refresh_token\":\"$refresh\"}" | json_field refresh_token)
done
# Tokens rotated within the grace window are kept for it; one refresh after the window
# prunes them, as a client refreshing every 15 minutes does each time.
sleep $((${TESSERA__TOKENS__REFRESH_REUSE_GRACE_SECS:-10} + 1))
refresh=$(curl -sf -X POST "$base/refresh" -H 'content-type: application/json' \
  -d "{\"refresh_token\":\"$refresh\"}" | json_field refresh_token)
after_refresh=$(snapshot)

access=$(head -n 1 "$work/access")
before_me=$(snapshot)
for _ in $(seq 1 "$N"); do
  curl -sf "$base/me" -H "authorization: Bearer $access" >/dev/null
done
after_me=$(snapshot)

before_logout=$(snapshot)
while read -r token; do
  curl -s -o /dev/null -w "%{http_code}\n" -X POST "$base/logout" -H "authorization: Bearer $token" >>"$work/logout-status"
done <"$work/access"
after_logout=$(snapshot)
not_ok=$(grep -vc '^204$' "$work/logout-status" || true)
[ "$not_ok" = 0 ] || die "$not_ok logouts failed: $(sort "$work/logout-status" | uniq -c | tr '\n' ' ')"

marks=$(redis --scan --pattern "${prefix}revoked:*" | awk "NR == 1")
mark_bytes=$( [ -n "$marks" ] && redis memory usage "$marks" || echo 0)

echo
echo "Tessera per-operation costs, $(date -u '+%Y-%m-%d %H:%M UTC'), $N of each, one at a time"
echo
echo "| operation | WAL bytes | rows added: sessions / refresh tokens / audit / devices | table bytes (with indexes) | Redis commands | Redis bytes (in+out) |"
echo "|---|---:|---|---:|---:|---:|"
row "POST /login" "$before" "$after_login"
N=$((N + 1)) row "POST /refresh" "$before_refresh" "$after_refresh"
row "GET /me" "$before_me" "$after_me"
row "POST /logout" "$before_logout" "$after_logout"
echo
echo "Live session (sessions + refresh_tokens with indexes, after the logins): $live_bytes bytes."
echo "One revocation mark in Redis (MEMORY USAGE of a revoked:sid key): $mark_bytes bytes."
echo "(Redis figures include the measuring commands themselves: 2 INFO per snapshot, not per operation.)"
