#!/usr/bin/env bash
# How cost grows: bench_server `/read` requests/s with 1k, 100k and 1M sessions in the store,
# and with 100 B, 4 KiB and 64 KiB values in 1k sessions. Sessions are created through the
# store before serving (`--prefill`), and wrk reads 1000 of them at random (`--pool-out`).
# Server on CPU 0, wrk on CPU 1 (Redis on CPU 0 with the server), as in load.sh.
#
#   benches/scale.sh [STORE ...]      # default: memory; also sqlite, redis
#   COUNTS="1000 100000" SIZES="100 4096" DURATION=5s benches/scale.sh memory redis
set -euo pipefail
cd "$(dirname "$0")/.."
DRIVER=${DRIVER:-benches/driver}
DURATION=${DURATION:-8s}
WARMUP=${WARMUP:-2s}
PORT=${PORT:-18081}
REDIS_PORT=${REDIS_PORT:-16381}
COUNTS=${COUNTS:-1000 100000 1000000}
SIZES=${SIZES:-100 4096 65536}
STORES=("$@")
[ ${#STORES[@]} -gt 0 ] || STORES=(memory)

have=$(sed -n '/^\[features\]/,/^\[/p' Cargo.toml | sed -n 's/^\([a-z-]*\) *=.*/\1/p' | tr '\n' ' ')
feats=()
for f in memory sqlite redis webdis; do [[ " $have " == *" $f "* ]] && feats+=("$f"); done
cargo build --release --quiet --example bench_server --features "$(IFS=,; echo "${feats[*]}")"
BIN=target/release/examples/bench_server

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# measure STORE COUNT BYTES: prints one result line.
measure() {
  local store=$1 count=$2 bytes=$3 extra=() redis_pid=
  case $store in
    sqlite) rm -f "$work"/s.db*; extra=(--db "$work/s.db") ;;
    redis)
      # A fresh Redis per measurement: one that held a million keys stays slower after a
      # FLUSHALL (its allocator keeps the pages), which would blur the next rows.
      taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$work" >/dev/null 2>&1 &
      local redis_pid=$!
      pids+=("$redis_pid")
      until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
      extra=(--redis "redis://127.0.0.1:$REDIS_PORT") ;;
  esac
  local start=$SECONDS
  taskset -c 0 "$BIN" --port "$PORT" --store "$store" "${extra[@]}" --prefill "$count" \
    --value-bytes "$bytes" --pool-out "$work/pool" >"$work/server.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  until curl -fs "http://127.0.0.1:$PORT/untouched" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
  done
  local url="http://127.0.0.1:$PORT/read"
  taskset -c 1 wrk -t1 -c32 -d"$WARMUP" -s "$DRIVER/pool.lua" "$url" -- "$work/pool" >/dev/null
  local out
  out=$(taskset -c 1 wrk -t1 -c32 -d"$DURATION" -s "$DRIVER/pool.lua" "$url" -- "$work/pool" | grep '^RESULT')
  echo "SCALE $store sessions=$count value_bytes=$bytes prefill_s=$((SECONDS - start)) $out"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if [ -n "${redis_pid:-}" ]; then
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    wait "$redis_pid" 2>/dev/null || true
  fi
}

for store in "${STORES[@]}"; do
  for n in $COUNTS; do measure "$store" "$n" 16; done
  for b in $SIZES; do measure "$store" 1000 "$b"; done
done | tee "$work/out"

python3 - "$work/out" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    if line.startswith("SCALE"):
        kv = dict(re.findall(r"(\w+)=([\d.]+)", line))
        rows.append((line.split()[1], kv))
print(f"\n{'store':<8} {'sessions':>9} {'value B':>8} {'req/s':>10} {'p99 ms':>8} {'vs first':>8}")
first = {}
for store, kv in rows:
    rps = float(kv["rps"])
    first.setdefault(store, rps)
    print(f"{store:<8} {int(kv['sessions']):>9,} {int(kv['value_bytes']):>8,} {rps:>10,.0f} "
          f"{float(kv['p99_us'])/1000:>8.2f} {rps/first[store]:>8.2f}")
PY
