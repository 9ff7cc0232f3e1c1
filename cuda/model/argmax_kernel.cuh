// cuda/model/argmax_kernel.cuh: the device argmax of SeqBoatLmStreamerDevice::generate (greedy decoding), kept apart
// so that tests/cuda/emulation/emulate_argmax.cpp can run it on the host.
#pragma once

#include <climits>

namespace sma::cuda::lm {
namespace {

constexpr int kArgmaxThreads = 256;

// One CTA per stream b: the first index of the largest of logits[b, :] (sma::sample_token's greedy rule: a later
// equal value never wins) goes to next[b] and out[b * n_steps + step]. A non-finite logit records step * B + b in
// *bad (atomicMin: the earliest step, then the smallest stream).
__global__ void argmax_kernel(int B, int V, int n_steps, int step, const float* __restrict__ logits,
                              int* __restrict__ next, int* __restrict__ out, int* __restrict__ bad) {
  __shared__ float sv[kArgmaxThreads];
  __shared__ int si[kArgmaxThreads];
  const int b = blockIdx.x, t = threadIdx.x;
  const float* row = logits + static_cast<long long>(b) * V;
  float best = 0.f;
  int idx = INT_MAX;  // no candidate yet
  bool finite = true;
  for (int i = t; i < V; i += kArgmaxThreads) {
    const float v = row[i];
    finite = finite && isfinite(v);
    if (idx == INT_MAX || v > best) {  // ascending i: a tie keeps the lower index
      best = v;
      idx = i;
    }
  }
  if (!finite) atomicMin(bad, step * B + b);
  sv[t] = best;
  si[t] = idx;
  __syncthreads();
  for (int half = kArgmaxThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      const float v2 = sv[t + half];
      const int i2 = si[t + half];
      const int i1 = si[t];
      if (i2 != INT_MAX && (i1 == INT_MAX || v2 > sv[t] || (v2 == sv[t] && i2 < i1))) {
        sv[t] = v2;
        si[t] = i2;
      }
    }
    __syncthreads();
  }
  if (t == 0) {
    next[b] = si[0];
    out[static_cast<long long>(b) * n_steps + step] = si[0];
  }
}

}  // namespace
}  // namespace sma::cuda::lm
