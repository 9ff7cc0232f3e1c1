#!/bin/bash
# One GPU call over the whole CUDA backend, for a release check: the CUDA suite, memcheck on the quick cases,
# sma-golden --device cuda, the layer benchmark (bench/bench_cuda_layer.cpp, Google Benchmark), the official layer
# timed by shared/ref-bench/gpu/bench_gpu.py, the training-step benchmark with the official model's step, and the
# GPU training example. Each part runs only when its files are next to this script (see docs/cuda.md, "Building
# and running"): sma_test_cuda, sma-golden + golden/*.safetensors, sma_bench_cuda_layer (+ lib/libbenchmark.so*),
# sma_bench_cuda_model, train_gpu + fashion-mnist/, ref/{bench_gpu.py,bench_ref_model.py,standalone_seqboat.py,
# einops_fallback/}. Switches: SKIP_SANITIZE=1, MEMCHECK_FILTER (Catch2 test spec, default [quick]~[oom]), SKIP_REF=1,
# LAYER_FILTER (a --benchmark_filter regex), GPU_STEPS (train_gpu steps, default 1000), TEST_TIMEOUT (s, 240).
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH="$PWD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
have() { [ -x "./$1" ]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if have sma_test_cuda; then
  el tests
  timeout ${TEST_TIMEOUT:-240} ./sma_test_cuda --durations yes > "$OUT/test_all.txt" 2>&1; echo "all tests rc=$?"
  tail -2 "$OUT/test_all.txt"; grep -B3 -A30 FAILED "$OUT/test_all.txt" | head -120
  if [ -z "$SKIP_SANITIZE" ]; then
    el memcheck
    timeout 150 "$CS" --tool memcheck --leak-check full --error-exitcode 9 ./sma_test_cuda "${MEMCHECK_FILTER:-[quick]~[oom]}" \
      > "$OUT/memcheck.txt" 2>&1; echo "memcheck rc=$?"; tail -2 "$OUT/memcheck.txt"
  fi
fi
if have sma-golden; then
  el golden
  timeout 90 ./sma-golden --device cuda -v golden/*.safetensors > "$OUT/golden_cuda.txt" 2>&1; echo "golden rc=$?"
  grep -E "^(PASS|FAIL|SKIP|device|[0-9]+ cases)" "$OUT/golden_cuda.txt"
fi
if have sma_bench_cuda_layer; then
  el layer benchmark
  timeout 240 ./sma_bench_cuda_layer --benchmark_filter="${LAYER_FILTER:-.}" --benchmark_out="$OUT/bench_layer.json" \
    --benchmark_out_format=json > "$OUT/bench_layer.txt" 2>&1; echo "layer bench rc=$?"; cat "$OUT/bench_layer.txt"
fi
if [ -z "$SKIP_REF" ] && [ -f ref/bench_gpu.py ]; then
  el official layer
  (cd ref && PYTHONUNBUFFERED=1 timeout 200 python3 bench_gpu.py --parts rep --tokens 65536 --deadline 150 \
      --out "$OUT/ref" > "$OUT/ref_layer.txt" 2>&1; echo "ref layer rc=$?")
  grep -v Warning "$OUT/ref_layer.txt" | tail -25
fi
if have sma_bench_cuda_model; then
  el training step
  timeout 150 ./sma_bench_cuda_model 15 > "$OUT/bench_model.txt" 2>&1; echo "model bench rc=$?"; cat "$OUT/bench_model.txt"
  if [ -z "$SKIP_REF" ] && [ -f ref/bench_ref_model.py ]; then
    (cd ref && PYTHONUNBUFFERED=1 timeout 150 python3 bench_ref_model.py --reps 12 > "$OUT/ref_model.txt" 2>&1; \
      echo "ref model rc=$?")
    grep -v Warning "$OUT/ref_model.txt" | tail -8
  fi
fi
if have train_gpu && [ -d fashion-mnist ]; then
  el train_gpu
  SMA_FASHION_MNIST_DIR=$PWD/fashion-mnist timeout 150 ./train_gpu "${GPU_STEPS:-1000}" 64 0 > "$OUT/train_gpu.txt" 2>&1
  echo "train_gpu rc=$?"; tail -4 "$OUT/train_gpu.txt"
fi
el done
