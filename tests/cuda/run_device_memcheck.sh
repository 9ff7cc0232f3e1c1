#!/bin/bash
# compute-sanitizer memcheck (with leak check) over the CUDA suite one test case per process, so that the suite,
# too slow under the tool for one device call, can be covered over several calls. Next to sma_test_cuda (and lib/),
# in a carried folder (docs/cuda.md, "Building and running"). Writes $OUT/memcheck_cases.txt: one line per case
# with rc, the error and leak summaries and the seconds taken; $OUT/memcheck_fail.txt: the reports of failed cases.
# Switches: BUDGET (seconds for the whole run, default 520: cases not started by then are listed as not run),
# FIRST (start at the case with this number, 1-based, to continue a previous call), SKIP (a grep -E pattern of case
# names to leave out, e.g. the [oom] case whose deliberate failed allocation the tool counts).
# Catch2 reads a comma in a test spec as "or", so commas in names are escaped.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH="$PWD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUT"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
BUDGET=${BUDGET:-520}
FIRST=${FIRST:-1}
SKIP=${SKIP:-failed CUDA call becomes CudaError}
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
./sma_test_cuda --list-test-names-only 2>/dev/null | sed 's/^ *//' | grep -v '^$' | grep -v 'test cases' > "$OUT/cases.txt"
: > "$OUT/memcheck_cases.txt"
: > "$OUT/memcheck_fail.txt"
k=0
while IFS= read -r name; do
  k=$((k + 1))
  [ $k -lt "$FIRST" ] && continue
  if printf '%s' "$name" | grep -qE "$SKIP"; then echo "#$k skipped | $name" >> "$OUT/memcheck_cases.txt"; continue; fi
  left=$((BUDGET - ($(date +%s) - T0)))
  if [ $left -le 5 ]; then echo "#$k not run (budget) | $name" >> "$OUT/memcheck_cases.txt"; continue; fi
  spec=$(printf '%s' "$name" | sed 's/,/\\,/g')
  t=$(date +%s)
  timeout $left "$CS" --tool memcheck --leak-check full --report-api-errors no --error-exitcode 9 ./sma_test_cuda \
    "$spec" > /tmp/memcheck_case.txt 2>&1
  rc=$?
  err=$(grep -o "ERROR SUMMARY: [0-9]* errors" /tmp/memcheck_case.txt | tail -1)
  leak=$(grep -o "[0-9,]* bytes leaked" /tmp/memcheck_case.txt | tail -1)
  res=$(grep -E "^(All tests passed|test cases:|No test cases matched)" /tmp/memcheck_case.txt | tail -1)
  echo "#$k rc=$rc ${err:-no summary} | ${leak:-?} | $(($(date +%s) - t))s | $name | $res" >> "$OUT/memcheck_cases.txt"
  if [ $rc -ne 0 ]; then
    { echo "=== #$k $name (rc=$rc)"; grep -m20 -B2 -A12 "Invalid\|FAILED\|ERROR\|No test cases" /tmp/memcheck_case.txt; } \
      >> "$OUT/memcheck_fail.txt"
  fi
done < "$OUT/cases.txt"
cut -c1-200 "$OUT/memcheck_cases.txt"
echo "total $(($(date +%s) - T0))s"
