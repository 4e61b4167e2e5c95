#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable to about 1 %, unlike
# requests/s on a 2-core machine. Each server runs under callgrind on one CPU; a cookie pool of
# 1000 sessions is made through /login in the measured process; per endpoint, 500 warm-up
# requests, then N1 and N2 sequential keep-alive requests with random pool cookies, each
# counted between `callgrind_control -z` and `-d`; (I(N2) - I(N1)) / (N2 - N1) cancels the
# fixed costs. Prints one line per (server, endpoint) and the overhead over bare /untouched.
#
#   benches/callgrind.sh [STORE ...]     # default: memory
#   N1=1000 N2=3000 benches/callgrind.sh memory sqlite
#   SIGNING_KEY=$(openssl rand -hex 32) benches/callgrind.sh memory   # signed cookies
#
# SIGNING_KEY (64 hex digits) is passed to bench_server as `--signing-key`: every store's
# server then signs its cookies, and the pool cookies are the signed ones /login hands out.
#
# Needs valgrind (Debian package valgrind); the Redis store needs redis-server, the PostgreSQL
# store postgresql (benches/postgres.sh starts it on the other CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${N1:-1000}
N2=${N2:-3000}
PORT=${PORT:-18090}
REDIS_PORT=${REDIS_PORT:-16390}
PG_PORT=${PG_PORT:-15490}
FEATURES=${FEATURES:-memory,sqlite,redis,webdis,postgres}
STORES=("$@")
SIGN=()
[ -z "${SIGNING_KEY:-}" ] || SIGN=(--signing-key "$SIGNING_KEY")
[ ${#STORES[@]} -gt 0 ] || STORES=(memory)

command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }
have=$(sed -n '/^\[features\]/,/^\[/p' Cargo.toml | sed -n 's/^\([a-z-]*\) *=.*/\1/p' | tr '\n' ' ')
feats=()
for f in ${FEATURES//,/ }; do [[ " $have " == *" $f "* ]] && feats+=("$f"); done
# Debug info for readable profiles; same optimisation as release.
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --quiet \
  --example bench_server --example bare_server --features "$(IFS=,; echo "${feats[*]}")"
BIN=target/release/examples

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "profiles kept in $work" || rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=benches/postgres.sh
. benches/postgres.sh

# measure NAME ARGS...: run the server under callgrind and print per-endpoint figures.
measure() {
  local name=$1
  shift
  taskset -c 0 valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$work/$name.%p.out" \
    "$@" --port "$PORT" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  python3 - "$name" "$pid" "$PORT" "$N1" "$N2" "$work" <<'PY'
import glob, http.client, os, random, re, subprocess, sys, time
name, pid, port, n1, n2, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/untouched"); c.getresponse().read(); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"{name}: server did not start")
random.seed(1)
def get(path, cookie=None):
    c.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    r = c.getresponse(); r.read()
    assert r.status == 200, (path, r.status)
    return r
pool = []
for _ in range(1000):
    r = get("/login")
    sc = r.msg.get_all("Set-Cookie") or []
    pool.append(sc[0].split(";")[0] if sc else "id=" + os.urandom(11).hex())
def run(path, n):
    for _ in range(n):
        get(path, None if path == "/login" else random.choice(pool))
def total():
    before = set(glob.glob(f"{work}/{name}.{pid}.out*"))
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    for _ in range(100):
        new = set(glob.glob(f"{work}/{name}.{pid}.out*")) - before
        if new: break
        time.sleep(0.1)
    f = max(new, key=os.path.getmtime)
    time.sleep(0.2)
    text = open(f).read()
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    return int(m.group(1))
endpoints = ["/untouched"] if name == "bare" else ["/untouched", "/read", "/counter", "/login"]
for ep in endpoints:
    run(ep, 500)
    counts = []
    for n in (n1, n2):
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        run(ep, n)
        counts.append(total())
    per = (counts[1] - counts[0]) / (n2 - n1)
    print(f"RESULT {name} {ep} {per:.0f}", flush=True)
PY
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

out="$work/results"
measure bare "$BIN/bare_server" | tee -a "$out"
for store in "${STORES[@]}"; do
  case $store in
    memory) measure memory "$BIN/bench_server" --store memory "${SIGN[@]}" | tee -a "$out" ;;
    sqlite) measure sqlite "$BIN/bench_server" --store sqlite --db "$work/cg.db" "${SIGN[@]}" | tee -a "$out" ;;
    redis)
      taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
      pids+=("$!")
      sleep 0.5
      measure redis "$BIN/bench_server" --store redis --redis "redis://127.0.0.1:$REDIS_PORT" "${SIGN[@]}" | tee -a "$out" ;;
    postgres)
      start_postgres "$work/pg" "$PG_PORT" 1
      pids+=("$postgres_pid")
      measure postgres "$BIN/bench_server" --store postgres --postgres "postgres://postgres@127.0.0.1:$PG_PORT/postgres" "${SIGN[@]}" | tee -a "$out" ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
done
python3 - "$out" <<'PY'
import sys
rows = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith("RESULT")]
bare = next(float(v) for n, ep, v in rows if n == "bare")
print(f"\n{'store':<8} {'endpoint':<11} {'instr/req':>10} {'over bare':>10}")
for n, ep, v in rows:
    print(f"{n:<8} {ep:<11} {float(v):>10,.0f} {float(v) - bare:>+10,.0f}")
PY
