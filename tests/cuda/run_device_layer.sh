#!/bin/bash
# One GPU call for the EMA / layer part of the CUDA backend: the CUDA suite (with -s for the EMA and layer cases, so
# the accuracy lines are kept), memcheck + initcheck on the new quick cases, sma-golden --device cuda over the
# golden cases, sma_bench_cuda, and the official layer timed by shared/ref-bench/gpu/bench_gpu.py in the same call.
# Layout expected next to this script (built elsewhere, see docs/cuda.md): sma_test_cuda, sma_bench_cuda,
# sma-golden, golden/*.safetensors, ref/{bench_gpu.py,einops_fallback,standalone_seqboat.py} (optional).
# Switches: SKIP_SANITIZE=1, SKIP_REF=1, SKIP_BENCH=1, REF_DEADLINE (s).
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
el tests
timeout 120 ./sma_test_cuda --durations yes > "$OUT/test_all.txt" 2>&1; echo "all tests rc=$?"; tail -2 "$OUT/test_all.txt"
grep -B3 -A14 FAILED "$OUT/test_all.txt" | head -60
timeout 60 ./sma_test_cuda "[ema],[seqboat]" -s > /tmp/test_ema_layer.txt 2>&1; echo "ema/layer -s rc=$?"
{ echo "== accuracy lines of the [ema],[seqboat] cases (-s) =="; grep -E "gpu err|rel err|^  case|B=.*L=.*D=" /tmp/test_ema_layer.txt | sort | uniq -c | sort -rn | head -400; } >> "$OUT/test_all.txt"
if [ -z "$SKIP_SANITIZE" ]; then
  el memcheck
  timeout 120 "$CS" --tool memcheck --leak-check full --error-exitcode 9 ./sma_test_cuda "[ema][quick],[seqboat][quick]" > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -2 "$OUT/memcheck.txt"
  timeout 90 "$CS" --tool initcheck --check-api-memory-access no --error-exitcode 9 ./sma_test_cuda "[ema][quick],[seqboat][quick]~[bf16]" > "$OUT/initcheck.txt" 2>&1; echo "initcheck rc=$?"; tail -1 "$OUT/initcheck.txt"
fi
el golden
timeout 60 ./sma-golden --device cuda -v golden/*.safetensors > "$OUT/golden_cuda.txt" 2>&1; echo "golden rc=$?"
grep -E "^(PASS|FAIL|SKIP|device|[0-9]+ cases)" "$OUT/golden_cuda.txt"
if [ -z "$SKIP_BENCH" ]; then
  el bench
  timeout 200 ./sma_bench_cuda /dev/null 10 > "$OUT/bench.txt" 2>&1; echo "bench rc=$?"
  grep -E "^(device|ema|layer)" "$OUT/bench.txt"
  if command -v ncu > /dev/null && [ -f ncu_summary.py ]; then
    el profile
    timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv ./sma_bench_cuda /dev/null 1 profile \
        > /tmp/ncu.csv 2> /tmp/ncu.err; echo "ncu rc=$?"
    python3 ncu_summary.py /tmp/ncu.csv > "$OUT/profile.txt" 2>&1; head -40 "$OUT/profile.txt"
  fi
fi
if [ -z "$SKIP_REF" ] && [ -f ref/bench_gpu.py ]; then
  el reference
  (cd ref && PYTHONUNBUFFERED=1 timeout $(( ${REF_DEADLINE:-200} + 40 )) python3 bench_gpu.py --parts rep --tokens 65536 \
      --deadline ${REF_DEADLINE:-200} --out "$OUT/ref" > "$OUT/ref.txt" 2>&1; echo "ref rc=$?")
  tail -25 "$OUT/ref.txt" | grep -v Warning
fi
el done
