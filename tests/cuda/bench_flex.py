#!/usr/bin/env python3
"""Baseline for sma_bench_cuda: PyTorch flex_attention with the same sliding window on the same card.

The compressed batch of sma_bench_cuda (B 16 rows of L 4096 tokens, activation density d) is modelled as B rows of
round(d * L) tokens. Cases, in priority order (a deadline stops the rest): 8 heads x 128 (the shape timed in
shared/ref-bench/gpu/bench_gpu.py), bf16 and fp32, causal and bidirectional.
Times: CUDA events, median after warm-up; torch.compile(flex_attention, dynamic=False), mask by create_block_mask.
Writes JSON lines to $OUT/bench_flex.jsonl and prints one line per case.
"""
import json, os, statistics, sys, time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

T0 = time.time()
DEADLINE = float(os.environ.get("FLEX_DEADLINE", "240"))
OUT = os.environ.get("OUT", ".")
W, B, L = 256, 16, 4096
flex = torch.compile(flex_attention, dynamic=False)
torch._dynamo.config.cache_size_limit = 64
dev = torch.cuda.get_device_name(0)
print("device:", dev, "torch", torch.__version__, "allow_tf32(matmul)", torch.backends.cuda.matmul.allow_tf32, flush=True)
jf = open(os.path.join(OUT, "bench_flex.jsonl"), "w")


def causal_mask(b, h, q, k):
    return (q >= k) & (q - k <= W)


def bidir_mask(b, h, q, k):
    return (q - k <= W) & (k - q <= W)


def timed(fn, reps=10):
    fn(); fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def case(density, heads, dqk, dv, dtype, causal):
    Lc = max(1, round(density * L))
    Lp = (Lc + 127) // 128 * 128  # flex wants block multiples; the padding keys are masked out below
    mm = causal_mask if causal else bidir_mask

    def mask(b, h, q, k):
        return mm(b, h, q, k) & (k < Lc) & (q < Lc)

    bm = create_block_mask(mask, None, None, Lp, Lp, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, heads, Lp, dqk, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, heads, Lp, dqk, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, heads, Lp, dv, device="cuda", dtype=dtype, generator=g)
    res = {}
    for mode in ("fwd", "fwdbwd"):
        if time.time() - T0 > DEADLINE:
            res[mode] = None
            continue
        t = time.time()
        try:
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return flex(q, k, v, block_mask=bm)
            else:
                for x in (q, k, v):
                    x.requires_grad_(True)
                go = torch.randn(B, heads, Lp, dv, device="cuda", dtype=dtype, generator=g)

                def fn():
                    for x in (q, k, v):
                        x.grad = None
                    flex(q, k, v, block_mask=bm).backward(go)
            fn(); torch.cuda.synchronize()
            compile_s = time.time() - t
            res[mode] = timed(fn)
            err = None
        except Exception as e:  # noqa
            res[mode], compile_s, err = None, time.time() - t, repr(e)[:300]
        rec = dict(device=dev, density=density, tokens=B * Lc, heads=heads, dqk=dqk, dv=dv, dtype=str(dtype),
                   causal=causal, window=W, mode=mode, ms=res[mode], first_call_s=round(compile_s, 1), err=err)
        jf.write(json.dumps(rec) + "\n"); jf.flush()
        print("flex %-8s d=%.1f tokens=%6d heads=%d qk=%d v=%d %-14s %s: %s (first call %.1fs)%s" % (
            mode, density, B * Lc, heads, dqk, dv, str(dtype), "causal" if causal else "bidir",
            "%.3f ms" % res[mode] if res[mode] is not None else "n/a", compile_s, "  " + err if err else ""), flush=True)
    del q, k, v
    torch.cuda.empty_cache()


# One head of q/k width 128 with v width 1024 (SeqBoat's own shape) does not fit flex_attention's Triton kernel
# (it asks for ~600 KB of shared memory on an H100, measured), so SeqBoat's H = 1024 is modelled as 8 heads of 128:
# the same A.V work as sma's kernel, 8x its score work.
plan = [(1.0, 8, 128, 128, torch.bfloat16, True), (1.0, 8, 128, 128, torch.float32, True),
        (0.1, 8, 128, 128, torch.bfloat16, True), (0.5, 8, 128, 128, torch.bfloat16, True),
        (1.0, 8, 128, 128, torch.bfloat16, False), (0.1, 8, 128, 128, torch.float32, True),
        (0.5, 8, 128, 128, torch.float32, True)]
for c in plan:
    if time.time() - T0 > DEADLINE:
        print("deadline: skipped", c, flush=True)
        continue
    case(*c)
print("total %.1fs" % (time.time() - T0))
