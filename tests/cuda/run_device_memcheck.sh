#!/bin/bash
# compute-sanitizer (memcheck with leak check by default) over the CUDA suite, one test case per process, several
# processes at once, so that the suite, too slow under the tool for one device call run serially, fits in one or
# two calls. Next to sma_test_cuda (and lib/), in a carried folder (docs/cuda.md, "Building and running").
# Writes $OUT/memcheck_cases.txt: one line per case with rc, the error and leak summaries and the seconds taken;
# $OUT/memcheck_fail.txt: the reports of failed cases.
# Switches:
#   BUDGET  seconds for the whole run (default 520): cases not started by then are listed as not run, and a case
#           still running then is stopped (rc 124);
#   JOBS    processes at once (default 6): a sanitized case spends most of its time in the tool's host side and
#           leaves the GPU mostly idle, so cases share one GPU well;
#   FIRST   start at the case with this number (1-based), to continue a previous call; LAST: stop after it;
#   SKIP    a grep -E pattern of case names to leave out (default: the [oom] case, whose deliberate failed
#           allocation the tool counts);
#   SERIAL  a grep -E pattern of case names to run one at a time after the others: under the tool, several
#           processes running the bounded products' graphs (conditional nodes) at once stopped with
#           cudaErrorIllegalAddress that the tool attributed to no access, and the same cases run alone are clean
#           (docs/benchmarks.md, "Session 8"); e.g. SERIAL='bf16|cached graphs' in the default graph mode;
#   TOOL    memcheck (default) or racecheck;
#   KEEP    1: keep every case's whole report in $OUT/logs/.
# Catch2 reads a comma in a test spec as "or", so commas in names are escaped.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH="$PWD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUT"
export CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
export TOOL=${TOOL:-memcheck}
BUDGET=${BUDGET:-520}
JOBS=${JOBS:-6}
FIRST=${FIRST:-1}
LAST=${LAST:-100000}
SKIP=${SKIP:-failed CUDA call becomes CudaError}
T0=$(date +%s)
export T_END=$((T0 + BUDGET))
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
./sma_test_cuda --list-test-names-only 2>/dev/null | sed 's/^ *//' | grep -v '^$' | grep -v 'test cases' > "$OUT/cases.txt"
WORK=$(mktemp -d)
export WORK

# One case: "$1" is "number<TAB>name". Writes $WORK/<number>.line and, on failure, $WORK/<number>.fail.
run_case() {
  local k=${1%%	*} name=${1#*	}
  local left=$((T_END - $(date +%s)))
  if [ $left -le 5 ]; then echo "#$k not run (budget) | $name" > "$WORK/$k.line"; return; fi
  local spec log t rc err leak res
  spec=$(printf '%s' "$name" | sed 's/,/\\,/g')
  log="$WORK/$k.log"
  t=$(date +%s)
  local extra=()
  [ "$TOOL" = memcheck ] && extra=(--leak-check full --report-api-errors no)
  timeout $left "$CS" --tool "$TOOL" "${extra[@]}" --error-exitcode 9 ./sma_test_cuda "$spec" > "$log" 2>&1
  rc=$?
  err=$(grep -oE "(ERROR SUMMARY: [0-9]* errors|RACECHECK SUMMARY: [0-9]* hazards)" "$log" | tail -1)
  leak=$(grep -o "[0-9,]* bytes leaked" "$log" | tail -1)
  res=$(grep -E "^(All tests passed|test cases:|No test cases matched)" "$log" | tail -1)
  echo "#$k rc=$rc ${err:-no summary} | ${leak:-no leak report} | $(($(date +%s) - t))s | $name | $res" > "$WORK/$k.line"
  if [ $rc -ne 0 ]; then
    { echo "=== #$k $name (rc=$rc)"; grep -m20 -B2 -A12 "Invalid\|FAILED\|ERROR\|Race\|No test cases" "$log"; } \
      > "$WORK/$k.fail"
  fi
  if [ "${KEEP:-0}" = 1 ]; then mkdir -p "$OUT/logs"; mv "$log" "$OUT/logs/$k.txt"; else rm -f "$log"; fi
}
export -f run_case

SERIAL=${SERIAL:-}
: > "$WORK/serial"
k=0
while IFS= read -r name; do
  k=$((k + 1))
  [ $k -lt "$FIRST" ] || [ $k -gt "$LAST" ] && continue
  if printf '%s' "$name" | grep -qE "$SKIP"; then echo "#$k skipped | $name" > "$WORK/$k.line"; continue; fi
  if [ -n "$SERIAL" ] && printf '%s' "$name" | grep -qE "$SERIAL"; then printf '%s\t%s\n' "$k" "$name" >> "$WORK/serial"; continue; fi
  printf '%s\t%s\0' "$k" "$name"
done < "$OUT/cases.txt" | xargs -0 -r -P "$JOBS" -I{} bash -c 'run_case "$1"' _ {}
while IFS= read -r entry; do run_case "$entry"; done < "$WORK/serial"

: > "$OUT/memcheck_cases.txt"
: > "$OUT/memcheck_fail.txt"
for f in $(ls "$WORK" | grep '\.line$' | sort -n); do cat "$WORK/$f" >> "$OUT/memcheck_cases.txt"; done
for f in $(ls "$WORK" | grep '\.fail$' | sort -n); do cat "$WORK/$f" >> "$OUT/memcheck_fail.txt"; done
rm -rf "$WORK"
cut -c1-200 "$OUT/memcheck_cases.txt"
echo "total $(($(date +%s) - T0))s, $JOBS at once, tool $TOOL"
