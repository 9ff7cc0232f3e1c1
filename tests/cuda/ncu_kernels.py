#!/usr/bin/env python3
"""Kernel times from `ncu --csv --metrics gpu__time_duration.sum` of `sma_bench_cuda OUT 1 attention-profile`
(two bf16 forward+backward passes): the second half of the launches, one line each, and their sum in ms."""
import csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
half = rows[len(rows)//2:]
tot = 0
for r in half:
    sc = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r["Metric Unit"], 1e-6)
    t = float(r["Metric Value"].replace(",", "")) * sc
    tot += t
    print(f'{t:8.4f} ms  grid {r["Grid Size"]:>16}  {r["Kernel Name"][:100]}')
print(f"total second pass {tot:.3f} ms over {len(half)} kernels")
