// Per-token kernels of a SeqBoat layer (include/sma/cuda/layer_ops.hpp): norms, SiLU, router, column sums.
// The norms use one warp per row (D up to any size, strided); reductions in float within a row, as the CPU does.
#include <sma/cuda/layer_ops.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sma::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ inline float sigmoidf_(float v) { return 1.f / (1.f + expf(-v)); }

__global__ void norm_forward_kernel(int kind, long long rows, int D, float eps, const float* __restrict__ x,
                                    const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ y,
                                    float* __restrict__ mean, float* __restrict__ rstd) {
  const int lane = threadIdx.x & 31;
  for (long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const float* xr = x + row * D;
    float m = 0.f;
    if (kind == 0) {
      float s = 0.f;
      for (int d = lane; d < D; d += 32) s += xr[d];
      m = warp_sum(s) / D;
    }
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float c = xr[d] - m;
      ss = fmaf(c, c, ss);
    }
    const float r = 1.f / sqrtf(warp_sum(ss) / D + eps);
    if (lane == 0) {
      if (mean) mean[row] = m;
      rstd[row] = r;
    }
    float* yr = y + row * D;
    for (int d = lane; d < D; d += 32) {
      const float xh = (xr[d] - m) * r;
      float v = xh;
      if (kind == 2) {
        if (w) v = xh * w[0];
      } else {
        if (w) v = xh * w[d];
        if (kind == 0 && bias) v += bias[d];
      }
      yr[d] = v;
    }
  }
}

__global__ void norm_backward_kernel(int kind, long long rows, int D, const float* __restrict__ x,
                                     const float* __restrict__ w, const float* __restrict__ mean,
                                     const float* __restrict__ rstd, const float* __restrict__ dy,
                                     float* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  for (long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const float* xr = x + row * D;
    const float* gr = dy + row * D;
    const float m = kind == 0 ? mean[row] : 0.f, r = rstd[row];
    float sg = 0.f, sgx = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float g = w ? gr[d] * (kind == 2 ? w[0] : w[d]) : gr[d];
      const float xh = (xr[d] - m) * r;
      sg += g;
      sgx = fmaf(g, xh, sgx);
    }
    const float mg = kind == 0 ? warp_sum(sg) / D : 0.f;
    const float mgx = warp_sum(sgx) / D;
    float* dr = dx + row * D;
    for (int d = lane; d < D; d += 32) {
      const float g = w ? gr[d] * (kind == 2 ? w[0] : w[d]) : gr[d];
      const float xh = (xr[d] - m) * r;
      dr[d] = (g - mg - xh * mgx) * r;
    }
  }
}

constexpr int kColRows = 256;  // rows per partial

// partial[chunk, c] = sum over the chunk's rows of a[r, c] (* b[r, c]); with x/mean/rstd instead of b, the norm's
// xhat (mode 1: layernorm, 2: rms) multiplies a.
__global__ void column_partial_kernel(long long rows, int cols, const float* __restrict__ a, int lda,
                                      const float* __restrict__ b, int mode, const float* __restrict__ x,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      double* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const long long r0 = static_cast<long long>(blockIdx.y) * kColRows;
  const long long r1 = min(rows, r0 + kColRows);
  double s = 0;
  for (long long r = r0; r < r1; ++r) {
    float v = a[r * lda + c];
    if (b) v *= b[r * lda + c];
    if (mode == 1) v *= (x[r * cols + c] - mean[r]) * rstd[r];
    if (mode == 2) v *= x[r * cols + c] * rstd[r];
    s += v;
  }
  partial[static_cast<long long>(blockIdx.y) * cols + c] = s;
}

// out[c] += sum of the partials (mode 3: all columns summed into out[0]).
__global__ void column_finish_kernel(int chunks, int cols, const double* __restrict__ partial, float* out, int all) {
  if (all) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0;
    for (long long i = 0; i < static_cast<long long>(chunks) * cols; ++i) s += partial[i];
    out[0] += static_cast<float>(s);
    return;
  }
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0;
  for (int k = 0; k < chunks; ++k) s += partial[static_cast<long long>(k) * cols + c];
  out[c] += static_cast<float>(s);
}

void column_reduce(long long rows, int cols, const float* a, int lda, const float* b, int mode, const float* x,
                   const float* mean, const float* rstd, float* out, bool all, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  const int chunks = static_cast<int>((rows + kColRows - 1) / kColRows);
  if (chunks > 65535) throw ValueError(str_cat("sma::cuda column sums: too many rows (", rows, ")"));
  detail::StreamWorkspace ws(s);
  double* part = ws.alloc<double>(static_cast<long long>(chunks) * cols);
  const int bx = std::min(128, (cols + 31) / 32 * 32);
  column_partial_kernel<<<dim3((cols + bx - 1) / bx, chunks), bx, 0, s>>>(rows, cols, a, lda, b, mode, x, mean, rstd,
                                                                          part);
  SMA_CUDA_CHECK_LAUNCH();
  column_finish_kernel<<<all ? 1 : (cols + 127) / 128, all ? 1 : 128, 0, s>>>(chunks, cols, part, out, all ? 1 : 0);
  SMA_CUDA_CHECK_LAUNCH();
}

__global__ void silu_kernel(long long n, const float* x, float* y) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    y[i] = v * sigmoidf_(v);
  }
}

__global__ void silu_backward_kernel(long long n, const float* x, const float* dy, float* dx) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float v = x[i], sg = sigmoidf_(v);
    dx[i] = dy[i] * (sg * (1.f + v * (1.f - sg)));
  }
}

__global__ void router_forward_kernel(long long rows, int length, const float* __restrict__ logits, int ld,
                                      float shift, const float* __restrict__ temp, const std::uint8_t* padding,
                                      float* __restrict__ probs, std::uint8_t* __restrict__ active,
                                      float* __restrict__ gate) {
  const float inv_tau = static_cast<float>(exp(-static_cast<double>(temp[0])));
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < rows;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float u0 = logits[i * ld] - shift / 2, u1 = logits[i * ld + 1] + shift / 2;
    const float s0 = u0 * inv_tau, s1 = u1 * inv_tau;
    const float mx = fmaxf(s0, s1);
    const float e0 = expf(s0 - mx), e1 = expf(s1 - mx);
    const float sum = e0 + e1;
    const float p0 = e0 / sum, p1 = e1 / sum;
    probs[2 * i] = p0;
    probs[2 * i + 1] = p1;
    const bool pad = padding != nullptr && padding[i] != 0;
    const bool on = p1 > p0 && !pad;
    active[i] = on ? 1 : 0;
    gate[i] = on ? p1 : 0.f;
  }
}

__global__ void router_backward_kernel(long long rows, const float* __restrict__ logits, int ld, float shift,
                                       const float* __restrict__ temp, const float* __restrict__ probs,
                                       const std::uint8_t* __restrict__ active, const float* __restrict__ dgate,
                                       float* __restrict__ dlogits, int ld_out, float* __restrict__ dtemp_part) {
  const float inv_tau = static_cast<float>(exp(-static_cast<double>(temp[0])));
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < rows;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    if (!active[i]) {
      dlogits[i * ld_out] = 0.f;
      dlogits[i * ld_out + 1] = 0.f;
      dtemp_part[i] = 0.f;
      continue;
    }
    const float u0 = logits[i * ld] - shift / 2, u1 = logits[i * ld + 1] + shift / 2;
    const float p0 = probs[2 * i], p1 = probs[2 * i + 1], dg = dgate[i];
    const float ds0 = dg * p1 * (0.f - p0), ds1 = dg * p1 * (1.f - p1);
    dlogits[i * ld_out] = ds0 * inv_tau;
    dlogits[i * ld_out + 1] = ds1 * inv_tau;
    dtemp_part[i] = -(ds0 * u0 * inv_tau) - ds1 * u1 * inv_tau;
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

void norm_forward(NormKind kind, long long rows, int D, float eps, const float* x, const float* weight,
                  const float* bias, float* y, float* mean, float* rstd, void* stream) {
  if (rows < 0 || D < 1) throw ValueError(str_cat("sma::cuda::norm_forward: bad sizes rows=", rows, " D=", D));
  if (rows == 0) return;
  if (!x || !y || !rstd || (kind == NormKind::layernorm && !mean))
    throw ValueError("sma::cuda::norm_forward: x, y, rstd (and mean for layernorm) must not be null");
  const int threads = 32 * kWarpsPerBlock;
  norm_forward_kernel<<<detail::grid_for(rows * 32, threads), threads, 0, as_stream(stream)>>>(
      static_cast<int>(kind), rows, D, eps, x, weight, bias, y, mean, rstd);
  SMA_CUDA_CHECK_LAUNCH();
}

void norm_backward(NormKind kind, long long rows, int D, const float* x, const float* weight, const float* mean,
                   const float* rstd, const float* dy, float* dx, float* dweight, float* dbias, void* stream) {
  if (rows < 0 || D < 1) throw ValueError(str_cat("sma::cuda::norm_backward: bad sizes rows=", rows, " D=", D));
  if (rows == 0) return;
  if (!x || !dy || !dx || !rstd || (kind == NormKind::layernorm && !mean))
    throw ValueError("sma::cuda::norm_backward: x, dy, dx, rstd (and mean for layernorm) must not be null");
  const cudaStream_t s = as_stream(stream);
  const int threads = 32 * kWarpsPerBlock;
  norm_backward_kernel<<<detail::grid_for(rows * 32, threads), threads, 0, s>>>(static_cast<int>(kind), rows, D, x,
                                                                                 weight, mean, rstd, dy, dx);
  SMA_CUDA_CHECK_LAUNCH();
  const int mode = kind == NormKind::layernorm ? 1 : 2;
  if (dweight && weight) column_reduce(rows, D, dy, D, nullptr, mode, x, mean, rstd, dweight,
                                       kind == NormKind::scalenorm, s);
  if (dbias && kind == NormKind::layernorm) column_reduce(rows, D, dy, D, nullptr, 0, nullptr, nullptr, nullptr, dbias,
                                                          false, s);
}

void silu_forward(long long n, const float* x, float* y, void* stream) {
  if (n <= 0) return;
  silu_kernel<<<detail::grid_for(n, 256), 256, 0, as_stream(stream)>>>(n, x, y);
  SMA_CUDA_CHECK_LAUNCH();
}

void silu_backward(long long n, const float* x, const float* dy, float* dx, void* stream) {
  if (n <= 0) return;
  silu_backward_kernel<<<detail::grid_for(n, 256), 256, 0, as_stream(stream)>>>(n, x, dy, dx);
  SMA_CUDA_CHECK_LAUNCH();
}

void router_forward(int batch, int length, const float* logits, int ld, float shift, const float* temp,
                    const std::uint8_t* padding, float* probs, std::uint8_t* active, float* gate, void* stream) {
  const long long rows = static_cast<long long>(batch) * length;
  if (rows <= 0) return;
  if (!logits || !temp || !probs || !active || !gate || ld < 2)
    throw ValueError("sma::cuda::router_forward: null pointer or row stride < 2");
  router_forward_kernel<<<detail::grid_for(rows, 256), 256, 0, as_stream(stream)>>>(rows, length, logits, ld, shift,
                                                                                    temp, padding, probs, active, gate);
  SMA_CUDA_CHECK_LAUNCH();
}

void router_backward(long long rows, const float* logits, int ld, float shift, const float* temp, const float* probs,
                     const std::uint8_t* active, const float* dgate, float* dlogits, int ld_out, float* dtemp,
                     void* stream) {
  if (rows <= 0) return;
  if (!logits || !temp || !probs || !active || !dgate || !dlogits || !dtemp || ld < 2 || ld_out < 2)
    throw ValueError("sma::cuda::router_backward: null pointer or row stride < 2");
  const cudaStream_t s = as_stream(stream);
  detail::StreamWorkspace ws(s);
  float* part = ws.alloc<float>(rows);
  router_backward_kernel<<<detail::grid_for(rows, 256), 256, 0, s>>>(rows, logits, ld, shift, temp, probs, active,
                                                                     dgate, dlogits, ld_out, part);
  SMA_CUDA_CHECK_LAUNCH();
  column_reduce(rows, 1, part, 1, nullptr, 0, nullptr, nullptr, nullptr, dtemp, false, s);
}

void column_sum_add(long long rows, int cols, const float* a, int lda, const float* b, float* out, void* stream) {
  if (rows <= 0 || cols <= 0) return;
  if (!a || !out || lda < cols) throw ValueError("sma::cuda::column_sum_add: null pointer or lda < cols");
  column_reduce(rows, cols, a, lda, b, 0, nullptr, nullptr, nullptr, out, false, as_stream(stream));
}

}  // namespace sma::cuda
