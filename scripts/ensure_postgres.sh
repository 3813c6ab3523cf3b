#!/usr/bin/env bash
# Makes sure the PostgreSQL the billing tests run against answers (default
# 127.0.0.1:5432). Starts the machine's cluster if it is down, waits for it, and
# fails loudly if it cannot: the PostgreSQL half of the tests never skips silently.
set -euo pipefail
HOST="${EMBER_PG_HOST:-127.0.0.1}"
PORT="${EMBER_PG_PORT:-5432}"

if ! command -v pg_isready >/dev/null; then
  echo "ensure_postgres: pg_isready not found; install the PostgreSQL client (apt-get install postgresql-client)" >&2
  exit 1
fi
if pg_isready -q -h "$HOST" -p "$PORT"; then
  exit 0
fi
echo "ensure_postgres: PostgreSQL at $HOST:$PORT does not answer; starting it" >&2
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
fi
for _ in $(seq 1 30); do
  if pg_isready -q -h "$HOST" -p "$PORT"; then
    echo "ensure_postgres: PostgreSQL is up at $HOST:$PORT" >&2
    exit 0
  fi
  sleep 1
done
echo "ensure_postgres: ERROR: PostgreSQL at $HOST:$PORT is still down after 30 s." >&2
echo "  Start it by hand: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
echo "  (or point EMBER_TEST_POSTGRES_URL at a reachable server). The billing tests need it." >&2
exit 1
