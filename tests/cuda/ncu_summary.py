#!/usr/bin/env python3
"""Summarises `ncu --csv --metrics gpu__time_duration.sum` output of `sma_bench_cuda OUT 1 profile`: the kernels
between each pair of marker launches (silu_kernel with grid (1, 1, 1)), grouped by name, in ms."""
import csv, sys, collections

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
sections, cur = [], None
for r in rows:
    name = r["Kernel Name"].split("(")[0]
    if name.endswith("silu_kernel") and r["Grid Size"].replace(" ", "") == "(1,1,1)":
        if cur is None:
            cur = []
        else:
            sections.append(cur)
            cur = None
        continue
    if cur is not None:
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r["Metric Unit"], 1e-6)
        cur.append((name, float(r["Metric Value"].replace(",", "")) * scale))
for label, sec in zip(["fp32, density 1", "bf16 projections + attention, density 1",
                        "bf16 projections + attention, density 0.1"], sections):
    agg = collections.OrderedDict()
    for n, t in sec:
        c, s = agg.get(n, (0, 0.0))
        agg[n] = (c + 1, s + t)
    total = sum(t for _, t in sec)
    print(f"## {label}: {len(sec)} kernels, {total:.3f} ms summed (B=16 L=4096, fwd+bwd)")
    for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{t:8.3f} ms  {c:3d}x  {n[:110]}")
