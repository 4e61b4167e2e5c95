#!/usr/bin/env bash
# The load benchmark of the peer benchmark's contract (its SPEC.md, an external document this
# repository does not carry; the driver scripts the contract names are copied in
# benches/driver): bench_server (per store) against a bare hyper server with the same
# endpoints, wrk with a pool of 1000 session cookies, server pinned to CPU 0 and wrk to CPU 1,
# 2 s warm-up then DURATION per endpoint. The bare server runs before, between and after the
# stores; ratios are to the median of its /untouched runs.
#
#   benches/load.sh [STORE ...]        # default: memory; also sqlite redis webdis postgres, and axum
#                                      # (bench_server --stack axum on the memory store)
#   DURATION=8s WARMUP=2s benches/load.sh memory redis
#
# "redis cmds/req" counts every command Redis executed (INFO commandstats), those run inside
# the stores' Lua scripts included; the round trips per request are counted by the tests.
#
# Needs wrk (Debian package wrk) and, per store, its server (redis-server, webdis, postgresql;
# PostgreSQL runs on the server's CPU with its stock settings, see benches/postgres.sh). Traffic
# goes to 127.0.0.1 only; every wrk run is bounded by its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
DRIVER=${DRIVER:-benches/driver}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
PORT=${PORT:-18080}
REDIS_PORT=${REDIS_PORT:-16379}
WEBDIS_PORT=${WEBDIS_PORT:-17379}
PG_PORT=${PG_PORT:-15432}
FEATURES=${FEATURES:-memory,sqlite,redis,webdis,postgres}
STORES=("$@")
[ ${#STORES[@]} -gt 0 ] || STORES=(memory)
ENDPOINTS=(untouched read counter login)

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
[ -d "$DRIVER" ] || { echo "driver scripts not found at $DRIVER (set DRIVER=)" >&2; exit 1; }

# Build with whichever of the requested features this checkout has.
have=$(sed -n '/^\[features\]/,/^\[/p' Cargo.toml | sed -n 's/^\([a-z-]*\) *=.*/\1/p' | tr '\n' ' ')
feats=()
for f in ${FEATURES//,/ }; do [[ " $have " == *" $f "* ]] && feats+=("$f"); done
# `axum` is bench_server's other stack: hyper-sessions on axum, as the peers are.
if [[ " ${STORES[*]} " == *" axum "* ]]; then feats+=(axum); fi
cargo build --release --quiet --example bench_server --example bare_server --features "$(IFS=,; echo "${feats[*]}")"
BIN=target/release/examples

work=$(mktemp -d)
server_pid="" redis_pid="" webdis_pid="" postgres_pid=""
cleanup() {
  for p in $server_pid $redis_pid $webdis_pid $postgres_pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
# shellcheck source=benches/postgres.sh
. benches/postgres.sh
trap cleanup EXIT

wait_ready() {
  for _ in $(seq 150); do
    curl -fs "http://127.0.0.1:$PORT/untouched" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not become ready" >&2
  return 1
}

start_redis() {
  command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install -y redis-server" >&2; exit 1; }
  taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server did not start" >&2; exit 1
}

redis_calls() {
  [ -n "$redis_pid" ] || { echo 0; return; }
  redis-cli -p "$REDIS_PORT" info commandstats |
    awk -F'[=,:]' '/^cmdstat_/ && $1 !~ /cmdstat_(info|ping|flushall|config|client|hello|select)$/ {s += $3} END {print s + 0}'
}

results="$work/results"
: >"$results"

# run NAME STORE ARGS...: start the server, check it, run every endpoint.
run() {
  local name=$1 store=$2
  shift 2
  taskset -c 0 "$@" >"$work/server.log" 2>&1 &
  server_pid=$!
  wait_ready
  local url="http://127.0.0.1:$PORT"
  if [ "$name" = bare ]; then
    python3 "$DRIVER/check.py" --url "$url" --no-session | tail -1
    python3 "$DRIVER/mkpool.py" --url "$url" --synthetic --out "$work/pool"
  else
    python3 "$DRIVER/check.py" --url "$url" | tail -1
    python3 "$DRIVER/mkpool.py" --url "$url" --out "$work/pool"
  fi
  local endpoints=("${ENDPOINTS[@]}")
  [ "$name" = bare ] && endpoints=(untouched)
  for ep in "${endpoints[@]}"; do
    local pool="$work/pool"
    [ "$ep" = login ] && pool=-
    taskset -c 1 wrk -t1 -c32 -d"$WARMUP" -s "$DRIVER/pool.lua" "$url/$ep" -- "$pool" >/dev/null
    local before after
    before=$(redis_calls)
    local out
    out=$(taskset -c 1 wrk -t1 -c32 -d"$DURATION" -s "$DRIVER/pool.lua" "$url/$ep" -- "$pool" | grep '^RESULT')
    after=$(redis_calls)
    echo "$name $store $ep $out calls=$((after - before))" | tee -a "$results"
  done
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
}

run bare - "$BIN/bare_server" --port "$PORT"
for store in "${STORES[@]}"; do
  case $store in
    memory) run hyper-sessions memory "$BIN/bench_server" --port "$PORT" --store memory ;;
    axum) run hyper-sessions-axum memory "$BIN/bench_server" --port "$PORT" --store memory --stack axum ;;
    sqlite)
      rm -f "$work/bench.db" "$work/bench.db-wal" "$work/bench.db-shm"
      run hyper-sessions sqlite "$BIN/bench_server" --port "$PORT" --store sqlite --db "$work/bench.db"
      ls -l "$work"/bench.db* | awk '{print "sqlite file " $NF ": " $5 " bytes"}' ;;
    redis)
      start_redis
      run hyper-sessions redis "$BIN/bench_server" --port "$PORT" --store redis --redis "redis://127.0.0.1:$REDIS_PORT"
      kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid="" ;;
    webdis)
      start_redis
      command -v webdis >/dev/null || { echo "webdis is missing: apt-get install -y webdis" >&2; exit 1; }
      cat >"$work/webdis.json" <<JSON
{"redis_host": "127.0.0.1", "redis_port": $REDIS_PORT, "http_host": "127.0.0.1", "http_port": $WEBDIS_PORT,
 "threads": 1, "pool_size": 8, "daemonize": false, "verbosity": 1, "logfile": "$work/webdis.log"}
JSON
      taskset -c 0 webdis "$work/webdis.json" >/dev/null 2>&1 &
      webdis_pid=$!
      sleep 0.5
      run hyper-sessions webdis "$BIN/bench_server" --port "$PORT" --store webdis --webdis "http://127.0.0.1:$WEBDIS_PORT"
      kill "$webdis_pid" "$redis_pid"; wait 2>/dev/null || true; webdis_pid="" redis_pid="" ;;
    postgres)
      start_postgres "$work/pg" "$PG_PORT" 0
      run hyper-sessions postgres "$BIN/bench_server" --port "$PORT" --store postgres --postgres "postgres://postgres@127.0.0.1:$PG_PORT/postgres"
      kill -INT "$postgres_pid"; wait "$postgres_pid" 2>/dev/null || true; postgres_pid="" ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
  run bare - "$BIN/bare_server" --port "$PORT"
done

python3 - "$results" <<'PY'
import re, statistics, sys
rows = []
for line in open(sys.argv[1]):
    name, store, ep, *rest = line.split()
    kv = dict(re.findall(r"(\w+)=([\d.]+)", " ".join(rest)))
    rows.append((name, store, ep, kv))
bare = [float(kv["rps"]) for n, _, _, kv in rows if n == "bare"]
base = statistics.median(bare)
print(f"\nbare /untouched runs: {', '.join(f'{b:,.0f}' for b in bare)} req/s; median {base:,.0f}")
print(f"{'server':<15} {'store':<8} {'endpoint':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} {'redis cmds/req':>14} {'errors':>6}")
for name, store, ep, kv in rows:
    if name == "bare":
        continue
    reqs = float(kv["requests"])
    cmds = float(kv.get("calls", 0))
    errs = sum(int(float(kv[k])) for k in kv if k.startswith("err_"))
    per = f"{cmds / reqs:.2f}" if store in ("redis", "webdis") and reqs else "-"
    print(f"{name:<15} {store:<8} /{ep:<9} {float(kv['rps']):>10,.0f} {float(kv['p50_us'])/1000:>8.2f} "
          f"{float(kv['p99_us'])/1000:>8.2f} {float(kv['rps'])/base:>6.2f} {per:>14} {errs:>6}")
PY
