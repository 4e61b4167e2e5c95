# Sourced by benches/load.sh and benches/callgrind.sh: starts a throwaway PostgreSQL (Debian
# package postgresql) for the postgres store's runs.
#
#   start_postgres DIR PORT CPU    # sets postgres_pid; the server listens on 127.0.0.1:PORT
#
# initdb into DIR (as the `postgres` user through setpriv when run as root, which PostgreSQL
# refuses), then `postgres` pinned to CPU with the settings in PG_SETTINGS (default: none beyond
# the stock configuration, so commits are fsynced as in production; e.g.
# PG_SETTINGS="-c synchronous_commit=off" for SQLite-like durability).

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -n "$dir" ] && [ -x "$dir/$1" ]; then echo "$dir/$1"; else command -v "$1"; fi
}

start_postgres() {
  local dir=$1 port=$2 cpu=$3 as=()
  local initdb postgres isready
  initdb=$(pg_bin initdb) && postgres=$(pg_bin postgres) && isready=$(pg_bin pg_isready) || {
    echo "PostgreSQL is missing: apt-get install -y postgresql" >&2; exit 1; }
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    chmod o+x "$(dirname "$dir")" # mktemp -d makes it 0700

    as=(setpriv --reuid=postgres --regid=postgres --clear-groups --)
  fi
  "${as[@]}" "$initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale --no-sync \
    --no-instructions >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  # shellcheck disable=SC2086 # PG_SETTINGS is a list of arguments
  taskset -c "$cpu" "${as[@]}" "$postgres" -D "$dir/data" -p "$port" -k "$dir" -h 127.0.0.1 \
    -c max_connections=100 ${PG_SETTINGS:-} >"$dir/postgres.log" 2>&1 &
  postgres_pid=$!
  for _ in $(seq 100); do
    "$isready" -q -h 127.0.0.1 -p "$port" && return 0
    sleep 0.1
  done
  echo "postgres did not start:" >&2; cat "$dir/postgres.log" >&2; exit 1
}
