#!/usr/bin/env bash
# Builds every cargo-fuzz target under fuzz/ and runs each in turn for a time box, one process
# at a time, then prints one summary line per target (executions, exec/s, cov, ft, corpus).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# Works on a stable toolchain: `-s none` turns the sanitizers off (they need nightly, and the
# crate forbids unsafe code anyway), which leaves cargo-fuzz passing only stable rustc flags,
# so no RUSTC_BOOTSTRAP is needed. `-a` keeps debug assertions and overflow checks on.
# New corpus entries go to fuzz/corpus/<target>/ (only seed-* files are committed), crashes to
# fuzz/artifacts/<target>/, full logs to fuzz/target/fuzz-logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }

FUZZ_FLAGS=(-s none -a)
dict="$PWD/fuzz/fuzz.dict"
logs="$PWD/fuzz/target/fuzz-logs"

echo "==> cargo fuzz build ${FUZZ_FLAGS[*]}"
start=$SECONDS
cargo fuzz build "${FUZZ_FLAGS[@]}"
echo "    built in $((SECONDS - start)) s"
mkdir -p "$logs"

summary=()
failed=0
for t in "${targets[@]}"; do
  echo "==> fuzzing $t for $secs s"
  log="$logs/$t.log"
  status=ok
  started=$SECONDS
  # -timeout: an input taking over 10 s is a hang (a crash for this run).
  if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" -- \
      -max_total_time="$secs" -dict="$dict" -timeout=10 -print_final_stats=1 \
      >"$log" 2>&1; then
    status=FAILED
    failed=1
    tail -n 40 "$log"
  fi
  took=$((SECONDS - started))
  # The last status line carries cov/ft/corp; the final stats carry the exec counts. The time
  # shown includes the start-up (loading the corpus); it is shorter when a crash stopped the run.
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9a-zA-Z]+).*/\1/p' <<<"$last")
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  line=$(printf '%-16s %-6s %5ss  execs %-10s exec/s %-8s cov %-6s ft %-6s corp %s' \
    "$t" "$status" "$took" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
  echo "    $line"
  summary+=("$line")
done

echo "==> fuzz summary (logs in $logs)"
printf '    %s\n' "${summary[@]}"
if [ "$failed" != 0 ]; then
  echo "fuzzing found a crash: see fuzz/artifacts/ and the logs above" >&2
  exit 1
fi
