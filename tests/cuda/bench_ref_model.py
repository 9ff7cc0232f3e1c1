#!/usr/bin/env python3
"""One AdamW training step of the official SeqBoat classifier (renll/SeqBoat standalone_seqboat.py, SeqBoatModel)
at the CIFAR quickstart configuration that tests/cuda/bench_cuda_model.cpp times for sma: 8 layers, d_model 160,
d_qk 96, hdim 320, d_ema 16, mem_size 128, batchnorm post-norm, simple bias (max_positions 1024), bidirectional,
relu2, B 50 x L 1024, d_input 3, d_output 10, dropout 0 (as on sma's device, which has no dropout yet).
Step = zero_grad, forward, cross-entropy, backward, torch.optim.AdamW.step (lr 0: the same work, and the model,
hence its routing density, stays the initial one, as in the sma bench); fp32 and bf16 autocast; a fresh model
(same seed) for each precision.
Times: CUDA events per step, median after warm-up.

Usage: python3 bench_ref_model.py [--reps 12] [--warmup 3]
Needs standalone_seqboat.py beside this file (and einops, or the einops_fallback/ shim beside it).
"""
import argparse, os, statistics, sys

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import einops  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "einops_fallback"))
sys.path.insert(0, HERE)
import torch
import torch.nn.functional as F
import standalone_seqboat as sb

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=12)
ap.add_argument("--warmup", type=int, default=3)
args = ap.parse_args()

torch.manual_seed(0)
dev = "cuda"
B, L = 50, 1024
print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
x = torch.randn(B, L, 3, device=dev)
y = torch.randint(0, 10, (B,), device=dev)

for prec in ("fp32", "bf16-autocast"):
    torch.manual_seed(1)
    model = sb.SeqBoatModel(3, d_output=10, d_model=160, n_layers=8, dropout=0.0, prenorm=False, max_positions=1024,
                            d_qk=96, d_ema=16, mem_size=128, bidirectional=True, norm_type="batchnorm",
                            rel_pos_bias="simple", attention_activation="relu2").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    dens = {}  # each layer's fraction of tokens routed to the attention in the last forward (px argmax == 1)
    for i, layer in enumerate(model.seq_layers):
        layer.q_router.register_forward_hook(
            lambda mod, inp, out, i=i: dens.__setitem__(i, float((out.argmax(-1) == 1).float().mean())))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec != "fp32"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec != "fp32"):
            model(x)

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts), min(ts), max(ts)

    torch.cuda.reset_peak_memory_stats()
    try:
        med, lo, hi = timed(step)
        fmed, _, _ = timed(fwd)
        loss = float(step().detach())
        mem = torch.cuda.max_memory_allocated() / 2**30
        print("official %s B=%d L=%d step %.3f ms (median of %d; min %.3f max %.3f) forward(no_grad) %.3f ms "
              "| loss %.4f peak %.2f GiB density %.3f [%s]" % (prec, B, L, med, args.reps, lo, hi, fmed, loss, mem,
                                                             sum(dens.values()) / max(len(dens), 1),
                                                             ",".join("%.3f" % dens[k] for k in sorted(dens))),
              flush=True)
    except Exception as e:  # noqa: BLE001 (report and go on to the other precision)
        print("official %s failed: %r" % (prec, e), flush=True)
    del model, opt
    torch.cuda.empty_cache()
