#!/bin/bash
# One GPU call for the step graph (branch step-graph; set_step_graph, sma/cuda/step_graph.hpp): the [graph] cases
# (graph steps bitwise equal to plain steps), the whole CUDA suite, memcheck on the [graph] cases, and the training
# step of the classifier and of the LM timed plainly and as a graph in the same run.
# Layout next to this script: sma_test_cuda, sma_bench_cuda_model, sma_bench_cuda_lm. Switches: SKIP_SUITE,
# SKIP_SANITIZE, SKIP_BENCH.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u +%Y-%m-%dT%H:%MZ
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
el graph cases
timeout 120 ./sma_test_cuda "[graph]" -s > "$OUT/test_graph.txt" 2>&1; echo "graph cases rc=$?"
tail -3 "$OUT/test_graph.txt"; grep -B5 -A25 FAILED "$OUT/test_graph.txt" | head -120
if [ -z "$SKIP_SUITE" ]; then
  el suite
  timeout 240 ./sma_test_cuda > "$OUT/test_all.txt" 2>&1; echo "suite rc=$?"; tail -2 "$OUT/test_all.txt"
  grep -B3 -A30 FAILED "$OUT/test_all.txt" | head -100
fi
if [ -z "$SKIP_SANITIZE" ]; then
  el memcheck
  timeout 200 "$CS" --tool memcheck --error-exitcode 9 ./sma_test_cuda "[graph]" > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.txt"
fi
if [ -z "$SKIP_BENCH" ]; then
  el bench
  timeout 200 ./sma_bench_cuda_model 15 graph > "$OUT/bench_model.txt" 2>&1; echo "bench model rc=$?"
  cat "$OUT/bench_model.txt"
  timeout 150 ./sma_bench_cuda_lm 15 16 1024 graph > "$OUT/bench_lm.txt" 2>&1; echo "bench lm rc=$?"
  cat "$OUT/bench_lm.txt"
fi
el done
