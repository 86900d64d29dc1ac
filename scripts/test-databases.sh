#!/usr/bin/env bash
# Removal of the test suite's databases and key directories, sourced by scripts/test.sh.
# Names carry the run id (tessera_test_r<pid>_..., tessera-test-keys-r<pid>_..., and
# tessera-test-data-r<pid>_... for the SQLite databases of the embedded run):
#   drop_test_databases own    removes this run's ($TESSERA_TEST_RUN)
#   drop_test_databases stale  removes those of runs whose process is gone
# so two runs at once never remove each other's. Needs TESSERA_TEST_POSTGRES.

run_is_over() { # run id r<pid>: true when that process is gone
  local pid=${1#r}
  case $pid in '' | *[!0-9]* | 0) return 1 ;; esac
  [ "r$pid" != "$TESSERA_TEST_RUN" ] && ! kill -0 "$pid" 2>/dev/null
}

is_doomed() { # which run
  if [ "$1" = own ]; then [ "$2" = "$TESSERA_TEST_RUN" ]; else run_is_over "$2"; fi
}

drop_test_databases() { # own | stale
  local which=$1 name run dir tmp=${TMPDIR:-/tmp}
  for dir in "$tmp"/tessera-test-keys-r* "$tmp"/tessera-test-data-r*; do
    [ -e "$dir" ] || continue
    run=${dir#"$tmp"/tessera-test-*-}
    if is_doomed "$which" "${run%%_*}"; then rm -rf "$dir"; fi
  done
  command -v psql >/dev/null || return 0
  local base=$TESSERA_TEST_POSTGRES doomed=()
  while read -r name; do
    [ -n "$name" ] || continue
    run=${name#tessera_test_}
    if is_doomed "$which" "${run%%_*}"; then doomed+=("$name"); fi
  done < <(psql "$base/postgres" -tAc "SELECT datname FROM pg_database WHERE datname ~ '^tessera_test_r[0-9]+_'" 2>/dev/null || true)
  [ ${#doomed[@]} -gt 0 ] || return 0
  printf '==> dropping %s test databases (%s)\n' "${#doomed[@]}" "$which" >&2
  for name in "${doomed[@]}"; do echo "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE);"; done |
    psql -q "$base/postgres" >/dev/null 2>&1 || true
}
