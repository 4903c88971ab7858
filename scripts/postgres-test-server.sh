#!/usr/bin/env bash
# Start a local PostgreSQL server for the shared-study tests and print its URL.
# Installs Debian's postgresql package when missing (needs root and apt); prints nothing
# and exits 1 when no server can be had, and the tests then skip with that reason.
set -u
URL="postgresql://peftune:peftune@127.0.0.1:5432/peftune_test"
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! ready; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
      >/dev/null 2>&1 || exit 1
  fi
  version=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
  [ -n "$version" ] || exit 1
  pg_lsclusters -h 2>/dev/null | grep -q "^$version main" || \
    pg_createcluster "$version" main >/dev/null 2>&1 || exit 1
  pg_ctlcluster "$version" main start >/dev/null 2>&1 || exit 1
  for _ in $(seq 30); do ready && break; sleep 1; done
  ready || exit 1
fi
as_pg() { runuser -u postgres -- "$@" 2>/dev/null || su postgres -c "$*" 2>/dev/null; }
as_pg psql -q -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='peftune') THEN CREATE ROLE peftune LOGIN PASSWORD 'peftune'; END IF; END\$\$;" >/dev/null
as_pg psql -tAc "SELECT 1 FROM pg_database WHERE datname='peftune_test'" | grep -q 1 || \
  as_pg createdb -O peftune peftune_test >/dev/null
echo "$URL"
