#!/bin/bash
# One GPU call for the attention (fp32 and bf16 paths): optional ncu kernel times of one bf16 forward+backward
# (PROFILE=1), the [attention] tests, memcheck (MEMCHECK_FILTER, default the bf16 quick cases), racecheck on [race],
# sma_bench_cuda's attention rows, then bench_flex.py (SKIP_FLEX=1 leaves it out). Put this file, ncu_kernels.py,
# bench_flex.py, sma_test_cuda and sma_bench_cuda in one folder (docs/cuda.md, "Building and running").
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"; cat "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
chmod +x sma_test_cuda sma_bench_cuda
if [ -n "$PROFILE" ]; then
el ncu
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 120 "$NCU" --csv --metrics gpu__time_duration.sum ./sma_bench_cuda /dev/null 1 attention-profile > "$OUT/ncu.csv" 2> "$OUT/ncu.err"; echo "ncu rc=$?"
python3 ncu_kernels.py "$OUT/ncu.csv" | tee "$OUT/ncu_summary.txt"; tail -3 "$OUT/ncu.err"
fi
el tests
timeout ${TEST_TIMEOUT:-150} ./sma_test_cuda "${TEST_FILTER:-[attention]}" --durations yes > "$OUT/test.txt" 2>&1; echo "test rc=$?" | tee -a "$OUT/test.txt"
tail -4 "$OUT/test.txt"; grep -B3 -A30 FAILED "$OUT/test.txt" | head -150
if [ -z "$SKIP_SANITIZE" ]; then
el memcheck
timeout ${MEMCHECK_TIMEOUT:-150} "$CS" --tool memcheck --leak-check full --report-api-errors no --error-exitcode 9 ./sma_test_cuda "${MEMCHECK_FILTER:-[bf16][quick]}" > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"
tail -3 "$OUT/memcheck.txt"
el racecheck
timeout ${RACECHECK_TIMEOUT:-100} "$CS" --tool racecheck --racecheck-report all --error-exitcode 9 ./sma_test_cuda "[race]" > "$OUT/racecheck.txt" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"
tail -3 "$OUT/racecheck.txt"
fi
el bench
timeout ${BENCH_TIMEOUT:-150} ./sma_bench_cuda "$OUT/bench_cuda.jsonl" ${BENCH_REPS:-10} attention > "$OUT/bench_cuda.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench_cuda.txt"
cat "$OUT/bench_cuda.txt"
if [ -z "$SKIP_FLEX" ]; then
el flex
FLEX_DEADLINE=${FLEX_DEADLINE:-150} timeout ${FLEX_TIMEOUT:-200} python3 bench_flex.py > "$OUT/flex.txt" 2>&1; echo "flex rc=$?" >> "$OUT/flex.txt"
grep -v Warning "$OUT/flex.txt" | tail -20
fi
el done
