#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the multi-worker sweep test (run as root, sourced by .ci/run).
# Exports TUMORBENCH_TEST_POSTGRES and TUMORBENCH_TEST_POSTGRES_MLFLOW; stop it with `tumorbench_pg_stop`.
# Each step checks itself (`|| return 1`): a script sourced in an `if` runs without errexit. The
# port is a free one (PG_PORT to choose), so a server left over on the machine is never reused.
set -uo pipefail
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PG_PORT=${PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PG_DATA=$(mktemp -d /tmp/tumorbench-pg.XXXXXX) || return 1
chown postgres "$PG_DATA" || return 1
su postgres -s /bin/sh -c "$PG_BIN/initdb -D $PG_DATA -A trust -U postgres" >/dev/null || return 1
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $PG_DATA -l $PG_DATA/server.log -w \
  -o '-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1' start" >/dev/null || return 1
psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE USER tumorbench PASSWORD 'tumorbench'" \
     -c "CREATE DATABASE tumorbench OWNER tumorbench" -c "CREATE DATABASE tumorbench_mlflow OWNER tumorbench" \
     || return 1
# One database for Optuna's study, one for MLflow's runs (both keep an alembic_version table).
export TUMORBENCH_TEST_POSTGRES="postgresql://tumorbench:tumorbench@127.0.0.1:$PG_PORT/tumorbench"
export TUMORBENCH_TEST_POSTGRES_MLFLOW="postgresql://tumorbench:tumorbench@127.0.0.1:$PG_PORT/tumorbench_mlflow"
# Stopping never changes the verdict: the tests' exit status is what CI reports.
tumorbench_pg_stop() { su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $PG_DATA -m fast stop" >/dev/null || true
                       rm -rf "$PG_DATA"; }
echo "PostgreSQL test server on 127.0.0.1:$PG_PORT ($PG_BIN)"
