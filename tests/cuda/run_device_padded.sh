#!/bin/bash
# One GPU call for the bf16 attention's caller-written padded operands (LocalAttentionInputs::*_padded, and
# SeqBoatLayerDevice's padded_attention_operands): the CUDA suite, memcheck on the new cases, racecheck on [race],
# then the training step (sma_bench_cuda_model) with the layer's padded operands on and off
# (SMA_CUDA_PADDED_ATTENTION=1 / 0; only the "bf16-projections+bf16-attention" line differs), and with PROFILE=1
# ncu kernel times of one such step each way (pad_bf16_kernel launches should be gone with them on).
# Layout next to this script: sma_test_cuda, sma_bench_cuda_model, ncu_step_summary.py (optional).
# Switches: TEST_FILTER (default: the whole suite), SKIP_SANITIZE, SKIP_BENCH, BENCH_REPS (default 15), PROFILE.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
chmod +x sma_test_cuda sma_bench_cuda_model 2> /dev/null
el tests
timeout ${TEST_TIMEOUT:-240} ./sma_test_cuda ${TEST_FILTER:+"$TEST_FILTER"} --durations yes > "$OUT/test.txt" 2>&1
echo "tests rc=$?" | tee -a "$OUT/test.txt"; tail -3 "$OUT/test.txt"; grep -B3 -A30 FAILED "$OUT/test.txt" | head -150
grep -E "padded|bitwise|DIFFERS" "$OUT/test.txt" | head -20
if [ -z "$SKIP_SANITIZE" ]; then
  el memcheck
  timeout 200 "$CS" --tool memcheck --leak-check full --report-api-errors no --error-exitcode 9 ./sma_test_cuda \
      "*padded*" > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"; tail -3 "$OUT/memcheck.txt"
  el racecheck
  timeout 120 "$CS" --tool racecheck --error-exitcode 9 ./sma_test_cuda "[race]" > "$OUT/racecheck.txt" 2>&1
  echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"; tail -2 "$OUT/racecheck.txt"
fi
if [ -z "$SKIP_BENCH" ]; then
  for on in 1 0 1 0; do  # alternated, so that drift shows
    el "bench SMA_CUDA_PADDED_ATTENTION=$on"
    SMA_CUDA_PADDED_ATTENTION=$on timeout 150 ./sma_bench_cuda_model ${BENCH_REPS:-15} 2>&1 | grep "bf16-attention" \
        | sed "s/^/padded=$on /" | tee -a "$OUT/bench.txt"
  done
fi
if [ -n "$PROFILE" ] && command -v ncu > /dev/null; then
  for on in 1 0; do
    el "ncu SMA_CUDA_PADDED_ATTENTION=$on"
    SMA_CUDA_PADDED_ATTENTION=$on timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        ./sma_bench_cuda_model 1 profile 2 > "$OUT/ncu_padded$on.csv" 2> /tmp/ncu.err; echo "ncu rc=$?"
    grep -c pad_bf16_kernel "$OUT/ncu_padded$on.csv" | sed "s/^/pad_bf16_kernel rows (warm-up + timed step): /"
    [ -f ncu_step_summary.py ] && python3 ncu_step_summary.py "$OUT/ncu_padded$on.csv" > "$OUT/ncu_padded$on.txt" 2>&1
  done
fi
el done
