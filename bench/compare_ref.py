#!/usr/bin/env python3
"""Times the official SeqBoat layer and sma's side by side, in the same session, and prints a markdown table.

usage: compare_ref.py SMA_BENCH_LAYER REFERENCE_PY [--ref-bench DIR] [--rounds 3] [--reps 5]
                      [--configs default|quick] [--threads 2] [--json OUT]

For every configuration and every round it runs ../shared/ref-bench/ref_cpu_bench.py (the official layer, PyTorch,
`--threads` threads) and then `sma-bench-layer` with the same configuration, so that both see the same machine
state; with several rounds the order alternates. Each program reports the median over its repetitions; the table
gives, per configuration, the median over the rounds of those medians, and the ratio official / sma. Nothing of the
official code is kept: REFERENCE_PY is the path of its standalone_seqboat.py (see bench/README.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (D, W, direction, B, L, density, modes)
CONFIGS = {
    "default": [
        (256, 256, "bidir", 1, 4096, 0.5, ("infer", "train")),
        (256, 256, "causal", 1, 4096, 0.5, ("infer", "train")),
        (256, 256, "bidir", 4, 4096, 0.5, ("infer", "train")),
        (256, 256, "causal", 4, 4096, 0.5, ("infer", "train")),
        (128, 128, "bidir", 1, 16384, 0.1, ("infer", "train")),
    ],
    "quick": [
        (256, 256, "bidir", 1, 4096, 0.5, ("infer", "train")),
        (256, 256, "causal", 1, 4096, 0.5, ("infer", "train")),
    ],
}

REF_MODE = {"infer": "infer", "train": "train_fwdbwd"}


def load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_ref(args, cfg):
    D, W, direction, B, L, density, modes = cfg
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
        out = tmp.name
    cmd = [args.python, os.path.join(args.ref_bench, "ref_cpu_bench.py"), args.reference, "--out", out,
           "--pairs", "%d:%d" % (D, W), "--dirs", direction, "--batches", str(B), "--lengths", str(L),
           "--densities", str(density), "--modes", ",".join(REF_MODE[m] for m in modes), "--reps", str(args.reps),
           "--threads", str(args.threads), "--max-seconds", "120"]
    env = dict(os.environ, PYTHONPATH=os.path.join(args.ref_bench, "einops_shim"))
    if args.ref_keep_memory:
        # The same malloc policy sma-bench-layer sets for itself (keep freed memory): without it the official layer
        # spends most of its time faulting in fresh pages on a VM (measured: docs/benchmarks.md, CPU section).
        env["GLIBC_TUNABLES"] = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736:"
                                 "glibc.malloc.top_pad=1073741824")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(out) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    os.unlink(out)
    res = rows[-1].get("results", {})
    return {m: res[REF_MODE[m]] for m in modes if REF_MODE[m] in res}


def run_sma(args, cfg):
    D, W, direction, B, L, density, modes = cfg
    out = {}
    for m in modes:
        cmd = [args.sma, "--D", str(D), "--W", str(W), "--direction", direction, "--B", str(B), "--L", str(L),
               "--density", str(density), "--mode", m, "--threads", str(args.threads), "--reps",
               str(max(args.reps, 5)), "--warmup", "1"]
        p = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[m] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sma")
    ap.add_argument("reference")
    ap.add_argument("--ref-bench", default=os.path.join(HERE, "..", "..", "shared", "ref-bench"))
    ap.add_argument("--python", default="/usr/bin/python3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--json", default=None, help="also write every measurement here (JSON lines)")
    ap.add_argument("--ref-keep-memory", action="store_true",
                    help="run the official layer with glibc told to keep freed memory, as sma-bench-layer does")
    args = ap.parse_args()
    args.ref_bench = os.path.abspath(args.ref_bench)

    records = []
    for r in range(args.rounds):
        for cfg in CONFIGS[args.configs]:
            order = (run_ref, run_sma) if r % 2 == 0 else (run_sma, run_ref)
            got = {}
            for fn in order:
                l0 = load()
                got[fn.__name__] = (fn(args, cfg), l0)
            rec = dict(round=r, cfg=cfg[:6], time=time.strftime("%Y-%m-%d %H:%M:%S"),
                       ref=got["run_ref"][0], sma=got["run_sma"][0], load_ref=got["run_ref"][1],
                       load_sma=got["run_sma"][1])
            records.append(rec)
            print("round %d %s: %s" % (r, cfg[:6], " ".join(
                "%s ref %.3f s sma %.4f s" % (m, rec["ref"][m]["median_s"], rec["sma"][m]["median_s"])
                for m in cfg[6] if m in rec["ref"])), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    print("| D | W | dir | B | L | density | mode | official s (median of %d rounds) | sma s | ratio | official peak GB | "
          "sma peak GB | load avg |" % args.rounds)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS[args.configs]:
        recs = [rec for rec in records if tuple(rec["cfg"]) == cfg[:6]]
        for m in cfg[6]:
            ref = [rec["ref"][m]["median_s"] for rec in recs if m in rec["ref"]]
            sma = [rec["sma"][m]["median_s"] for rec in recs]
            if not ref:
                continue
            rm, sm = statistics.median(ref), statistics.median(sma)
            rpk = max((rec["ref"][m].get("peak_rss_bytes") or 0) for rec in recs) / 1e9
            spk = max(rec["sma"][m]["peak_rss_bytes"] for rec in recs) / 1e9
            ld = statistics.mean([rec["load_ref"] for rec in recs] + [rec["load_sma"] for rec in recs])
            print("| %d | %d | %s | %d | %d | %.2f | %s | %.3f | %.4f | %.1fx | %.2f | %.3f | %.1f |" % (
                cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], recs[0]["sma"][m]["density"], m, rm, sm, rm / sm, rpk,
                spk, ld))


if __name__ == "__main__":
    main()
