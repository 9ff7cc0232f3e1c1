#!/bin/bash
# One GPU call for DeviceOptimizer (branch dev-optim): the [optim] cases (every kind against sma::optim, adamw bitwise
# DeviceAdamW, the model and LM trained with SGD and RAdam), the AdamW model/LM cases again (the chunk table moved
# out of adamw.cu), then memcheck and racecheck on the [optim] cases (the clipping kernels use shared memory).
# Layout next to this script: sma_test_cuda. Results under $OUT.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/optim.txt"
timeout 240 ./sma_test_cuda "[optim]" -s > /tmp/optim_s.txt 2>&1; echo "[optim] rc=$?" | tee -a "$OUT/optim.txt"
tail -3 /tmp/optim_s.txt | tee -a "$OUT/optim.txt"
grep -E "max \|dev - cpu\||after [0-9]+ steps|FAILED|failed" /tmp/optim_s.txt | sort | uniq -c | head -300 >> "$OUT/optim.txt"
grep -B5 -A30 FAILED /tmp/optim_s.txt | head -200 >> "$OUT/optim.txt"
timeout 240 ./sma_test_cuda "[model][quick],[lm][quick]" > /tmp/adamw.txt 2>&1; echo "AdamW model/LM rc=$?" | tee -a "$OUT/optim.txt"
tail -2 /tmp/adamw.txt | tee -a "$OUT/optim.txt"
timeout 150 "$CS" --tool memcheck --leak-check full --error-exitcode 9 ./sma_test_cuda "[cuda][optim]~[model]~[lm]" > /tmp/memcheck.txt 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/optim.txt"; tail -2 /tmp/memcheck.txt | tee -a "$OUT/optim.txt"
timeout 150 "$CS" --tool racecheck --error-exitcode 9 ./sma_test_cuda "[cuda][optim]~[model]~[lm]" > /tmp/racecheck.txt 2>&1
echo "racecheck rc=$?" | tee -a "$OUT/optim.txt"; tail -2 /tmp/racecheck.txt | tee -a "$OUT/optim.txt"
