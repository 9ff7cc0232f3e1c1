#!/bin/bash
# One GPU call for the model / training part of the CUDA backend: the CUDA suite (the [model] and [seqboat] cases
# with -s for their accuracy lines), memcheck and racecheck on the [model] cases, sma-golden --device cuda, the
# training-step benchmark (sma_bench_cuda_model) and the official model's step (bench_ref_model.py) in the same
# call, and optionally a kernel profile of one step (PROFILE=1; nsys if present, else ncu).
# Layout next to this script: sma_test_cuda, sma-golden, sma_bench_cuda_model, golden/*.safetensors,
# ref/{bench_ref_model.py,standalone_seqboat.py,einops_fallback/} (optional). Switches: SKIP_TESTS, SKIP_SANITIZE,
# SKIP_BENCH, SKIP_REF, PROFILE, PROFILE_MODES (default 0). The ncu CSVs hold a warm-up step and a timed step.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# few files under $OUT (the device tool returns a limited number): device lines go to golden_cuda.txt's head
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee /tmp/device.txt
date -u +%Y-%m-%dT%H:%MZ | tee -a /tmp/device.txt
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -z "$SKIP_TESTS" ]; then
  el tests
  timeout 240 ./sma_test_cuda --durations yes > "$OUT/test_all.txt" 2>&1; echo "all tests rc=$?"; tail -2 "$OUT/test_all.txt"
  grep -B3 -A30 FAILED "$OUT/test_all.txt" | head -150
  timeout 120 ./sma_test_cuda "[model],[seqboat]~[bf16]" -s > /tmp/test_model.txt 2>&1; echo "model/layer -s rc=$?"
  { echo "== accuracy lines of the [model],[seqboat] cases (-s) =="; grep -E "gpu err|rel err|after 3 steps|model case|^  case" /tmp/test_model.txt | sort | uniq -c | sort -rn | head -600; } >> "$OUT/test_all.txt"
fi
if [ -z "$SKIP_SANITIZE" ]; then
  el memcheck
  timeout 150 "$CS" --tool memcheck --leak-check full --error-exitcode 9 ./sma_test_cuda "[model][quick]" > /tmp/memcheck.txt 2>&1; echo "memcheck rc=$?"; tail -2 /tmp/memcheck.txt
  timeout 150 "$CS" --tool racecheck --error-exitcode 9 ./sma_test_cuda "[model][quick]" > /tmp/racecheck.txt 2>&1; echo "racecheck rc=$?"; tail -2 /tmp/racecheck.txt
  cat /tmp/memcheck.txt /tmp/racecheck.txt > "$OUT/sanitize.txt"
fi
el golden
cp /tmp/device.txt "$OUT/golden_cuda.txt"
timeout 60 ./sma-golden --device cuda -v golden/*.safetensors >> "$OUT/golden_cuda.txt" 2>&1; echo "golden rc=$?"
grep -E "^(PASS|FAIL|SKIP|device|[0-9]+ cases)" "$OUT/golden_cuda.txt"
if [ -z "$SKIP_BENCH" ]; then
  el bench
  timeout 150 ./sma_bench_cuda_model 15 > "$OUT/bench_model.txt" 2>&1; echo "bench rc=$?"; cat "$OUT/bench_model.txt"
fi
if [ -z "$SKIP_REF" ] && [ -f ref/bench_ref_model.py ]; then
  el reference
  (cd ref && PYTHONUNBUFFERED=1 timeout 150 python3 bench_ref_model.py --reps 12 > "$OUT/ref_model.txt" 2>&1; echo "ref rc=$?")
  grep -v Warning "$OUT/ref_model.txt" | tail -8
fi
if [ -n "$PROFILE" ]; then
  el profile
  if command -v nsys > /dev/null; then
    timeout 150 nsys profile -o /tmp/model_prof --force-overwrite true ./sma_bench_cuda_model 1 profile > /tmp/nsys.txt 2>&1; echo "nsys rc=$?"
    nsys stats --report cuda_gpu_kern_sum --format csv /tmp/model_prof.nsys-rep > "$OUT/profile_kern.csv" 2>/dev/null
    head -40 "$OUT/profile_kern.csv"
  elif command -v ncu > /dev/null; then
    for mode in ${PROFILE_MODES:-0}; do  # the bench's precision modes: 0 fp32, 1 bf16 projections, 2 + bf16 attention
      timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv ./sma_bench_cuda_model 1 profile \
          $mode > "$OUT/ncu_mode$mode.csv" 2> /tmp/ncu.err; echo "ncu mode $mode rc=$?"
    done
  fi
fi
el done
