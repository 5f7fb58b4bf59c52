# Sourced by .ci/test: a throwaway PostgreSQL server on loopback for the ledger tests.
# pg_start exports PREFLOOP_TEST_PG_URL; pg_stop stops the server and deletes its data.
# initdb refuses to run as root, so as root the server runs as the `postgres` user.

pg_start() {
  local bin
  bin=$(compgen -G "/usr/lib/postgresql/*/bin" | sort -V | tail -n 1)
  [ -n "$bin" ] || { echo "PostgreSQL server not installed (run .ci/setup)" >&2; return 1; }
  PG_DIR=$(mktemp -d /tmp/prefloop-pg.XXXXXX)
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$PG_DIR"
    as=(runuser -u postgres --)
  fi
  PG_CTL=("${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data")
  "${as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  "${PG_CTL[@]}" -l "$PG_DIR/server.log" -o "-k $PG_DIR -h 127.0.0.1 -p $PG_PORT -c max_connections=200 -c fsync=off" -w start >/dev/null \
    || { cat "$PG_DIR/server.log" >&2; return 1; }
  export PREFLOOP_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "PostgreSQL for tests at 127.0.0.1:$PG_PORT"
}

pg_stop() {
  [ -n "${PG_DIR:-}" ] || return 0
  "${PG_CTL[@]}" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  PG_DIR=
}
