#!/bin/bash
# Branch dev-lm-stream (SeqBoatLmStreamerDevice), one GPU call, under 4 minutes: the [stream] cases (the layer and
# LM streamers; -s keeps the accuracy lines), compute-sanitizer memcheck of "[cuda][lm][stream]", and
# sma_bench_cuda_lm_stream. Results under $OUT: device.txt, test.txt, memcheck.txt, bench.txt.
# Layout: this script next to sma_test_cuda and sma_bench_cuda_lm_stream (built with -DSMA_BUILD_BENCH=ON, stripped).
# Usage (from the repository root): bash .cb-dev-lm-stream/run.sh
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
el tests
timeout 100 ./sma_test_cuda "[stream]" -s --durations yes > "$OUT/test.txt" 2>&1; echo "tests rc=$?"
grep -E "max error|max relative|graph steps|activated|FAILED|failed" "$OUT/test.txt" | sort | uniq -c | head -40
tail -4 "$OUT/test.txt"
el memcheck
timeout 120 "$CS" --tool memcheck --leak-check full --error-exitcode 9 ./sma_test_cuda "[cuda][lm][stream]" \
  > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.txt"
el bench
timeout 60 ./sma_bench_cuda_lm_stream > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"; cat "$OUT/bench.txt"
el done
