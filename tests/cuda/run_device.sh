#!/bin/bash
# One call on a GPU machine: the CUDA tests, compute-sanitizer (memcheck, racecheck, initcheck), sma_bench_cuda and
# the flex_attention baseline, every result under $OUT. Copy this file and bench_flex.py into a CUDA build folder
# (built elsewhere: see docs/cuda.md) and run it from there. Switches: SKIP_SANITIZE=1, SKIP_FLEX=1, TEST_FILTER,
# *_TIMEOUT, BENCH_REPS, FLEX_DEADLINE.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"
cat "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
ls -la "$CS" >> "$OUT/device.txt" 2>&1
el tests
timeout ${TEST_TIMEOUT:-150} ./tests/sma_test_cuda ${TEST_FILTER:-} --durations yes > "$OUT/test.txt" 2>&1; echo "test rc=$?" | tee -a "$OUT/test.txt"
tail -4 "$OUT/test.txt"; grep -B2 -A14 FAILED "$OUT/test.txt" | head -80
if [ -z "$SKIP_SANITIZE" ]; then
el memcheck
timeout ${MEMCHECK_TIMEOUT:-120} "$CS" --tool memcheck --leak-check full --report-api-errors no --error-exitcode 9 ./tests/sma_test_cuda "[quick]" > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"
tail -3 "$OUT/memcheck.txt"
el racecheck
timeout ${RACECHECK_TIMEOUT:-120} "$CS" --tool racecheck --racecheck-report all --error-exitcode 9 ./tests/sma_test_cuda "[race],[compress]" > "$OUT/racecheck.txt" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"
tail -3 "$OUT/racecheck.txt"
el initcheck
timeout ${INITCHECK_TIMEOUT:-60} "$CS" --tool initcheck --check-api-memory-access no --error-exitcode 9 ./tests/sma_test_cuda "[quick]~[bf16]" > "$OUT/initcheck.txt" 2>&1; echo "initcheck rc=$?" | tee -a "$OUT/initcheck.txt"
tail -3 "$OUT/initcheck.txt"
fi
el bench
timeout ${BENCH_TIMEOUT:-120} ./tests/sma_bench_cuda "$OUT/bench_cuda.jsonl" ${BENCH_REPS:-10} > "$OUT/bench_cuda.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench_cuda.txt"
cat "$OUT/bench_cuda.txt"
if [ -z "$SKIP_FLEX" ]; then
el flex
FLEX_DEADLINE=${FLEX_DEADLINE:-200} timeout ${FLEX_TIMEOUT:-260} python3 bench_flex.py > "$OUT/flex.txt" 2>&1; echo "flex rc=$?" >> "$OUT/flex.txt"
cat "$OUT/flex.txt" | grep -v Warning | tail -20
fi
el done
