#!/usr/bin/env python3
"""Summarises `ncu --csv --metrics gpu__time_duration.sum ./sma_bench_cuda_model 1 profile MODE`: the profile holds
a warm-up step and a timed step with the same kernels, so the second half of the launches is the timed step. Prints
its kernel time grouped into parts (attention, EMA, GEMMs, column sums, ...) and the largest kernels, in ms."""
import collections, csv, sys

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
step = rows[len(rows) // 2:]
PARTS = [("attention", ("local_attention", "bias_reduce", "rotary", "band", "attn::")),
         ("EMA", ("fwd_local", "fwd_apply", "bwd_local", "bwd_apply", "carry_kernel", "omega_grad", "param_grad",
                  "ema")),
         ("GEMMs (cuBLAS)", ("gemm", "xmma", "sm90_", "sm80_", "cutlass", "nvjet")),
         ("column sums", ("column_partial", "column_finish")),
         ("batchnorm", ("bn_",)),
         ("bf16 conversions", ("to_bf16",))]
by_name, by_part = collections.Counter(), collections.Counter()
count = collections.Counter()
for r in step:
    name = r["Kernel Name"].split("(")[0]
    t = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(
        r["Metric Unit"], 1e-6)
    by_name[name] += t
    count[name] += 1
    part = next((p for p, keys in PARTS if any(k in name for k in keys)), "element-wise and other")
    by_part[part] += t
total = sum(by_part.values())
print(f"{len(step)} kernels, {total:.2f} ms summed")
for p, t in by_part.most_common():
    print(f"  {p:24s} {t:7.2f} ms  {100 * t / total:4.1f}%")
print("largest kernels:")
for n, t in by_name.most_common(15):
    print(f"  {t:7.3f} ms {count[n]:4d}x {n[:100]}")
