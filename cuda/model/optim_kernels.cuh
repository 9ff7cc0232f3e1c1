// cuda/model/optim_kernels.cuh: the kernels of the chunked optimisers (chunk_table.cuh): the clipping pair, and
// the RAdam and SGD updates of DeviceOptimizer (include/sma/cuda/optimizer.hpp), each one launch of
// ChunkTable::chunks() blocks of kThreads threads. Included by optimizer.cu only (the kernels have external
// linkage) and by tests/cuda/emulation/emulate_optim.cpp, which runs them on the host; they use nothing that
// tests/cuda/emulation/cuda_runtime.h does not emulate. The per-step scalars (radam_args, sgd_args) are computed on
// the host in double from the step count, so no update waits for the host; an update takes them by value, or, when
// `dev_args` is not null, from device memory (for a step recorded once as a CUDA graph and replayed).
#pragma once

#include "chunk_table.cuh"

#include <sma/cuda/optimizer.hpp>

#include <cmath>

namespace sma::cuda::chunked {

// Fixed tree over a block's doubles (blockDim.x a power of 2); the total ends in part[0].
__device__ inline void block_sum(double* part) {
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    __syncthreads();
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
  }
  __syncthreads();
}

// partial[chunk] = sum of g^2 over the chunk, in double.
__global__ void __launch_bounds__(kThreads) grad_square_kernel(const RangeDesc* __restrict__ ranges,
                                                               const ChunkDesc* __restrict__ chunks,
                                                               double* __restrict__ partial) {
  __shared__ double part[kThreads];
  const ChunkDesc ch = chunks[blockIdx.x];
  const RangeDesc r = ranges[ch.range];
  const long long end = min(r.n, ch.start + kChunk);
  double s = 0;
  for (long long i = ch.start + threadIdx.x; i < end; i += kThreads) {
    const double g = r.g[i];
    s += g * g;
  }
  part[threadIdx.x] = s;
  block_sum(part);
  if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

// norm[0] = the norm (double), scale[0] = max_norm / (norm + 1e-6) when the norm exceeds max_norm, else 1
// (sma::optim::clip_grad_norm's rule, the factor rounded to float as the CPU's T = float path does).
__global__ void __launch_bounds__(kNormThreads) clip_scale_kernel(int n, const double* __restrict__ partial,
                                                                  double max_norm, double* __restrict__ norm,
                                                                  float* __restrict__ scale) {
  __shared__ double part[kNormThreads];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += kNormThreads) s += partial[i];
  part[threadIdx.x] = s;
  block_sum(part);
  if (threadIdx.x == 0) {
    const double nm = sqrt(part[0]);
    norm[0] = nm;
    scale[0] = nm > max_norm ? static_cast<float>(max_norm / (nm + 1e-6)) : 1.f;
  }
}

/// RAdam (sma::optim::Adam's radam variant): AdamW's moments and decoupled decay; the step is
/// lr * rect * mhat / (sqrt(vhat) + eps) while the variance is tractable (`adaptive`, rho_t > 5), else lr * mhat.
struct RAdamArgs {
  float b1, b2, eps, lr, lr_wd, inv_bc1, inv_sqrt_bc2;
  float lr_rect;  // lr * rect, the product taken in double on the host
  int adaptive;
};

/// sma::optim::Adam::step's scalars for step `t` (counted from 1), in double, each rounded once to float.
inline RAdamArgs radam_args(const DeviceOptimizerConfig& c, long long t, double lr) {
  const double b1 = c.beta1, b2 = c.beta2, td = static_cast<double>(t);
  const double bc1 = 1 - std::pow(b1, td), bc2 = 1 - std::pow(b2, td);
  const double rho_inf = 2 / (1 - b2) - 1;
  const double rho_t = rho_inf - 2 * td * std::pow(b2, td) / bc2;
  const bool adaptive = rho_t > 5;
  const double rect =
      adaptive ? std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) : 1.0;
  RAdamArgs a;
  a.b1 = static_cast<float>(b1);
  a.b2 = static_cast<float>(b2);
  a.eps = static_cast<float>(c.eps);
  a.lr = static_cast<float>(lr);
  a.lr_wd = static_cast<float>(lr * c.weight_decay);
  a.inv_bc1 = static_cast<float>(1.0 / bc1);
  a.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  a.lr_rect = static_cast<float>(lr * rect);
  a.adaptive = adaptive ? 1 : 0;
  return a;
}

__global__ void __launch_bounds__(kThreads) radam_kernel(const RangeDesc* __restrict__ ranges,
                                                         const ChunkDesc* __restrict__ chunks,
                                                         float* __restrict__ m, float* __restrict__ v,
                                                         RAdamArgs host_args, const RAdamArgs* __restrict__ dev_args,
                                                         int zero_grads, const float* __restrict__ grad_scale) {
  const RAdamArgs a = dev_args ? *dev_args : host_args;
  const ChunkDesc ch = chunks[blockIdx.x];
  const RangeDesc r = ranges[ch.range];
  const long long end = min(r.n, ch.start + kChunk);
  const float lr_wd = r.decay ? a.lr_wd : 0.f;
  const float gs = grad_scale ? *grad_scale : 1.f;
  for (long long i = ch.start + threadIdx.x; i < end; i += kThreads) {
    const AdamMoments mv = adam_moments(r, i, m, v, a.b1, a.b2, grad_scale, gs);
    const float mhat = mv.m * a.inv_bc1;
    const float upd = a.adaptive ? a.lr_rect * mhat / (sqrtf(mv.v) * a.inv_sqrt_bc2 + a.eps) : a.lr * mhat;
    // w - (lr wd w + upd) rather than w (1 - lr wd) - upd: the small terms' rounding errors stay far below w's
    // last bit, so the one rounding of w is the CPU's (which computes in double) nearly always; the other order
    // rounds twice and drifts by a few ulp over a few steps.
    const float w = r.w[i];
    r.w[i] = w - (lr_wd * w + upd);
    if (zero_grads) r.g[i] = 0.f;
  }
}

/// SGD (sma::optim::Sgd, PyTorch's rule): g' = g + wd w (L2, on the decay ranges), buf = g' on the first step and
/// momentum buf + g' after, w -= lr (nesterov ? g' + momentum buf : buf).
struct SgdArgs {
  float lr, momentum, wd;
  int first, nesterov;
};

/// Step `t` (counted from 1): the first step starts the momentum buffer at the gradient, as sma::optim::Sgd does.
inline SgdArgs sgd_args(const DeviceOptimizerConfig& c, long long t, double lr) {
  SgdArgs a;
  a.lr = static_cast<float>(lr);
  a.momentum = static_cast<float>(c.momentum);
  a.wd = static_cast<float>(c.weight_decay);
  a.first = t == 1 ? 1 : 0;
  a.nesterov = c.nesterov ? 1 : 0;
  return a;
}

__global__ void __launch_bounds__(kThreads) sgd_kernel(const RangeDesc* __restrict__ ranges,
                                                       const ChunkDesc* __restrict__ chunks,
                                                       float* __restrict__ buf, SgdArgs host_args,
                                                       const SgdArgs* __restrict__ dev_args, int zero_grads,
                                                       const float* __restrict__ grad_scale) {
  const SgdArgs a = dev_args ? *dev_args : host_args;
  const ChunkDesc ch = chunks[blockIdx.x];
  const RangeDesc r = ranges[ch.range];
  const long long end = min(r.n, ch.start + kChunk);
  const float wd = r.decay ? a.wd : 0.f;
  const float gs = grad_scale ? *grad_scale : 1.f;
  for (long long i = ch.start + threadIdx.x; i < end; i += kThreads) {
    const long long k = r.moment_offset + i;
    const float w = r.w[i];
    const float g = (grad_scale ? r.g[i] * gs : r.g[i]) + wd * w;
    const float bk = a.first ? g : a.momentum * buf[k] + g;
    buf[k] = bk;
    r.w[i] = w - a.lr * (a.nesterov ? g + a.momentum * bk : bk);
    if (zero_grads) r.g[i] = 0.f;
  }
}

}  // namespace sma::cuda::chunked
