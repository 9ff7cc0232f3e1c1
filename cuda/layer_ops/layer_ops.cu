// Per-token kernels of a SeqBoat layer (include/sma/cuda/layer_ops.hpp): norms, SiLU, router, column sums.
// The norms use one warp per row (D up to any size, strided); reductions in float within a row, as the CPU does.
#include <sma/cuda/layer_ops.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

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
                                     float* __restrict__ dx, const float* __restrict__ residual) {
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
    const float* rr = residual ? residual + row * D : nullptr;
    for (int d = lane; d < D; d += 32) {
      const float g = w ? gr[d] * (kind == 2 ? w[0] : w[d]) : gr[d];
      const float xh = (xr[d] - m) * r;
      const float v = (g - mg - xh * mgx) * r;
      dr[d] = rr ? v + rr[d] : v;
    }
  }
}

constexpr int kColRows = 256;  // rows per partial

// partial[chunk, c] = sum over the chunk's rows of a[r, c] (* b[r, c]); with x/mean/rstd instead of b, the norm's
// xhat (mode 1: layernorm, 2: rms) multiplies a.
constexpr int kColGroups = 8;  // row groups per block of the column sums (32 columns x 8 groups)

// partial[chunk, c] = sum over the chunk's rows of a[r, c] (* b[r, c]); with x/mean/rstd instead of b, the norm's
// xhat (mode 1: layernorm, 2: rms) multiplies a. A block is 32 columns x 8 row groups: warps read 32 consecutive
// columns of one row (coalesced), each group sums every 8th row, and the 8 group sums are added in group order.
__device__ inline float load_f(const float* p) { return *p; }
__device__ inline float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <class T>
__global__ void __launch_bounds__(32 * kColGroups) column_partial_kernel(
    long long rows, int cols, const T* __restrict__ a, int lda, const float* __restrict__ b, int mode,
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
    const int* __restrict__ bound, double* __restrict__ partial) {
  __shared__ double part[kColGroups][32];
  const int c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  const long long r0 = static_cast<long long>(blockIdx.y) * kColRows;
  const long long r1 = min(rows, r0 + kColRows);  // r1 <= r0 past the bound: the block writes zeros
  double s = 0;
  if (c < cols)
    for (long long r = r0 + g; r < r1; r += kColGroups) {
      float v = load_f(a + r * lda + c);
      if (b) v *= b[r * lda + c];
      if (mode == 1) v *= (x[r * cols + c] - mean[r]) * rstd[r];
      if (mode == 2) v *= x[r * cols + c] * rstd[r];
      s += v;
    }
  part[g][threadIdx.x] = s;
  __syncthreads();
  if (g == 0 && c < cols) {
    double t = 0;
#pragma unroll
    for (int k = 0; k < kColGroups; ++k) t += part[k][threadIdx.x];
    partial[static_cast<long long>(blockIdx.y) * cols + c] = t;
  }
}

// column_partial_kernel for a bf16 matrix with an even column count and row stride: each thread sums two adjacent
// columns with 4-byte loads (a warp reads 128 consecutive bytes of a row), 64 columns per block.
__global__ void __launch_bounds__(32 * kColGroups) column_partial_bf16x2_kernel(long long rows, int cols,
                                                                              const __nv_bfloat162* __restrict__ a,
                                                                              int lda2, const int* __restrict__ bound,
                                                                              double* __restrict__ partial) {
  __shared__ double part[kColGroups][64];
  const int c2 = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  const long long r0 = static_cast<long long>(blockIdx.y) * kColRows;
  const long long r1 = min(rows, r0 + kColRows);
  double s0 = 0, s1 = 0;
  if (2 * c2 < cols)
    for (long long r = r0 + g; r < r1; r += kColGroups) {
      const float2 v = __bfloat1622float2(a[r * lda2 + c2]);
      s0 += v.x;
      s1 += v.y;
    }
  part[g][2 * threadIdx.x] = s0;
  part[g][2 * threadIdx.x + 1] = s1;
  __syncthreads();
  if (g == 0 && 2 * c2 < cols)
    for (int k = 0; k < 2; ++k) {
      double t = 0;
#pragma unroll
      for (int j = 0; j < kColGroups; ++j) t += part[j][2 * threadIdx.x + k];
      partial[static_cast<long long>(blockIdx.y) * cols + 2 * c2 + k] = t;
    }
}

// out[c] += sum of the partials (all: every column summed into out[0], by one thread). One warp per column: lanes
// take every 32nd chunk, then a fixed shuffle tree (deterministic).
__global__ void column_finish_kernel(int chunks, int cols, const double* __restrict__ partial, float* out, int all) {
  if (all) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0;
    for (long long i = 0; i < static_cast<long long>(chunks) * cols; ++i) s += partial[i];
    out[0] += static_cast<float>(s);
    return;
  }
  const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (c >= cols) return;  // whole warps leave together
  double s = 0;
  for (int k = lane; k < chunks; k += 32) s += partial[static_cast<long long>(k) * cols + c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) out[c] += static_cast<float>(s);
}

// Up to 4 matrices of one shape summed by column in one launch each for the partials and the finish.
struct ColumnSet {
  const float* a[4];
  float* out[4];
};

// column_partial_kernel (mode 0, no b, lda = cols) for matrix blockIdx.z of the set; partials of matrix z at
// partial + z * chunks * cols.
__global__ void __launch_bounds__(32 * kColGroups) column_partial_set_kernel(long long rows, int cols, ColumnSet set,
                                                                            const int* __restrict__ bound,
                                                                            double* __restrict__ partial) {
  __shared__ double part[kColGroups][32];
  const int c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y, z = blockIdx.z;
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  const float* a = set.a[z];
  const long long r0 = static_cast<long long>(blockIdx.y) * kColRows;
  const long long r1 = min(rows, r0 + kColRows);
  double s = 0;
  if (c < cols)
    for (long long r = r0 + g; r < r1; r += kColGroups) s += a[r * cols + c];
  part[g][threadIdx.x] = s;
  __syncthreads();
  if (g == 0 && c < cols) {
    double t = 0;
#pragma unroll
    for (int k = 0; k < kColGroups; ++k) t += part[k][threadIdx.x];
    partial[(static_cast<long long>(z) * gridDim.y + blockIdx.y) * cols + c] = t;
  }
}

// column_finish_kernel for the set: one warp per (matrix, column).
__global__ void column_finish_set_kernel(int chunks, int cols, int n, const double* __restrict__ partial,
                                         ColumnSet set) {
  const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (w >= n * cols) return;  // whole warps leave together
  const int z = w / cols, c = w % cols;
  const double* p = partial + static_cast<long long>(z) * chunks * cols;
  double s = 0;
  for (int k = lane; k < chunks; k += 32) s += p[static_cast<long long>(k) * cols + c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) set.out[z][c] += static_cast<float>(s);
}

template <class T>
void column_reduce(long long rows, int cols, const T* a, int lda, const float* b, int mode, const float* x,
                   const float* mean, const float* rstd, float* out, bool all, cudaStream_t s,
                   const int* bound = nullptr) {
  if (rows <= 0 || cols <= 0) return;
  const int chunks = static_cast<int>((rows + kColRows - 1) / kColRows);
  if (chunks > 65535) throw ValueError(str_cat("sma::cuda column sums: too many rows (", rows, ")"));
  detail::StreamWorkspace ws(s);
  double* part = ws.alloc<double>(static_cast<long long>(chunks) * cols);
  constexpr bool is_bf16 = std::is_same_v<T, __nv_bfloat16>;
  if (is_bf16 && cols % 2 == 0 && lda % 2 == 0 && reinterpret_cast<std::uintptr_t>(a) % 4 == 0)
    column_partial_bf16x2_kernel<<<dim3((cols / 2 + 31) / 32, chunks), dim3(32, kColGroups), 0, s>>>(
        rows, cols, reinterpret_cast<const __nv_bfloat162*>(a), lda / 2, bound, part);
  else
    column_partial_kernel<T><<<dim3((cols + 31) / 32, chunks), dim3(32, kColGroups), 0, s>>>(
        rows, cols, a, lda, b, mode, x, mean, rstd, bound, part);
  SMA_CUDA_CHECK_LAUNCH();
  // finish: 8 warps (columns) per block
  column_finish_kernel<<<all ? 1 : (cols + 7) / 8, all ? 1 : 256, 0, s>>>(chunks, cols, part, out, all ? 1 : 0);
  SMA_CUDA_CHECK_LAUNCH();
}


// BatchNorm channel sums over 256-row chunks. A block takes 32 channels (threadIdx.x; loads coalesced over
// channels) and 8 row groups (threadIdx.y: rows r0 + y, r0 + y + 8, ...), whose sums row 0 adds in order, so the
// result never depends on scheduling (one thread per channel and chunk, looping over the 256 rows alone, left the
// card mostly idle at D = 160: 25 us per call at the training step's 51,200 rows). mode 0: the sums of x - K and
// (x - K)^2 with K = x[0, c], a shift that keeps E[x^2] - E[x]^2 free of cancellation for any mean, so the
// statistics take one pass over x; mode 2: dy (into p1) and dy xhat (into p2).
__global__ void __launch_bounds__(32 * kColGroups) bn_partial_kernel(int mode, long long rows, int D,
                                                                      const float* __restrict__ x,
                                                                      const float* __restrict__ dy,
                                                                      const float* __restrict__ mean,
                                                                      const float* __restrict__ invstd,
                                                                      double* __restrict__ p1,
                                                                      double* __restrict__ p2) {
  __shared__ double part[2][kColGroups][32];
  const int c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
  const long long r0 = static_cast<long long>(blockIdx.y) * kColRows;
  const long long r1 = min(rows, r0 + kColRows);
  double s1 = 0, s2 = 0;
  if (c < D) {
    const float m = mode == 0 ? x[c] : mean[c];
    const float is = mode == 2 ? invstd[c] : 0.f;
    for (long long r = r0 + g; r < r1; r += kColGroups) {
      const float v = x[r * D + c];
      if (mode == 0) {
        const double d = static_cast<double>(v) - m;
        s1 += d;
        s2 += d * d;
      } else {
        const float gr = dy[r * D + c];
        s1 += gr;
        s2 += gr * ((v - m) * is);
      }
    }
  }
  part[0][g][threadIdx.x] = s1;
  part[1][g][threadIdx.x] = s2;
  __syncthreads();
  if (g == 0 && c < D) {
    double t1 = 0, t2 = 0;
#pragma unroll
    for (int k = 0; k < kColGroups; ++k) {
      t1 += part[0][k][threadIdx.x];
      t2 += part[1][k][threadIdx.x];
    }
    const long long o = static_cast<long long>(blockIdx.y) * D + c;
    p1[o] = t1;
    p2[o] = t2;
  }
}

// The chunk partials of channel c, summed by one warp: lane l adds chunks l, l + 32, ... in order, then a fixed
// shuffle tree (a thread walking all chunks alone was latency-bound: about 30 us per call at 200 chunks).
__device__ __forceinline__ double bn_warp_total(const double* __restrict__ p, int chunks, int D, int c, int lane) {
  double s = 0;
  for (int k = lane; k < chunks; k += 32) s += p[static_cast<long long>(k) * D + c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// mean, var and invstd from the shifted sums (bn_partial_kernel mode 0), one warp per channel; the running
// statistics, in float as the CPU layer updates them.
__global__ void bn_stats_kernel(int chunks, long long rows, int D, float eps, float momentum,
                                const float* __restrict__ x, const double* __restrict__ p1,
                                const double* __restrict__ p2, float* __restrict__ mean, float* __restrict__ invstd,
                                float* running_mean, float* running_var, float* nbt) {
  const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (c >= D) return;  // whole warps leave together
  const double s1 = bn_warp_total(p1, chunks, D, c, lane), s2 = bn_warp_total(p2, chunks, D, c, lane);
  if (lane != 0) return;
  const double n = static_cast<double>(rows), shifted = s1 / n;
  const float mu = static_cast<float>(static_cast<double>(x[c]) + shifted);
  const float var = static_cast<float>(max(s2 / n - shifted * shifted, 0.0));
  mean[c] = mu;
  invstd[c] = 1.f / sqrtf(var + eps);
  const float unbias = static_cast<float>(rows) / static_cast<float>(rows - 1);
  if (running_mean) running_mean[c] = (1.f - momentum) * running_mean[c] + momentum * mu;
  if (running_var) running_var[c] = (1.f - momentum) * running_var[c] + momentum * unbias * var;
  if (nbt && c == 0) nbt[0] += 1.f;
}

__global__ void bn_eval_stats_kernel(int D, float eps, const float* __restrict__ running_mean,
                                     const float* __restrict__ running_var, float* __restrict__ mean,
                                     float* __restrict__ invstd) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  mean[c] = running_mean[c];
  invstd[c] = 1.f / sqrtf(running_var[c] + eps);
}

// y = (x - mean) invstd [w + b], V consecutive elements per thread and step (V = 4: D % 4 == 0 and x, y 16-byte
// aligned, so a float4 never straddles two rows; one channel index per V elements).
template <int V>
__global__ void bn_apply_kernel(long long n, int D, const float* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ invstd, const float* __restrict__ w,
                                const float* __restrict__ b, float* __restrict__ y) {
  for (long long i = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) * V; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x * V) {
    const int c0 = static_cast<int>(i % D);
    float v[V];
    if constexpr (V == 4) {
      const float4 t = *reinterpret_cast<const float4*>(x + i);
      v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else {
      v[0] = x[i];
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = c0 + k;
      v[k] = (v[k] - mean[c]) * invstd[c];
      if (w) v[k] = v[k] * w[c] + b[c];
    }
    if constexpr (V == 4)
      *reinterpret_cast<float4*>(y + i) = make_float4(v[0], v[1], v[2], v[3]);
    else
      y[i] = v[0];
  }
}

// Sums of the backward (float, as the CPU keeps them), one warp per channel; dweight / dbias added.
__global__ void bn_grad_sums_kernel(int chunks, int D, const double* __restrict__ p1, const double* __restrict__ p2,
                                    float* __restrict__ sum_dy, float* __restrict__ sum_dyx, float* dweight,
                                    float* dbias) {
  const int c = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (c >= D) return;  // whole warps leave together
  const double s1 = bn_warp_total(p1, chunks, D, c, lane), s2 = bn_warp_total(p2, chunks, D, c, lane);
  if (lane != 0) return;
  sum_dy[c] = static_cast<float>(s1);
  sum_dyx[c] = static_cast<float>(s2);
  if (dweight) dweight[c] += static_cast<float>(s2);
  if (dbias) dbias[c] += static_cast<float>(s1);
}

// dx = (dy - mean dy - xhat mean(dy xhat)) invstd [w] (training) or dy invstd [w] (eval), plus `residual` when
// given; V elements per thread and step as bn_apply_kernel (V = 4 needs every pointer 16-byte aligned).
template <int V>
__global__ void bn_dx_kernel(long long n, int D, float inv_rows, int training, const float* __restrict__ x,
                             const float* __restrict__ mean, const float* __restrict__ invstd,
                             const float* __restrict__ w, const float* __restrict__ sum_dy,
                             const float* __restrict__ sum_dyx, const float* __restrict__ dy,
                             const float* __restrict__ residual, float* __restrict__ dx) {
  const auto load = [](const float* p, long long i, float* v) {
    if constexpr (V == 4) {
      const float4 t = *reinterpret_cast<const float4*>(p + i);
      v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else {
      v[0] = p[i];
    }
  };
  for (long long i = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) * V; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x * V) {
    const int c0 = static_cast<int>(i % D);
    float g[V], xv[V], r[V];
    load(dy, i, g);
    if (training) load(x, i, xv);
    if (residual) load(residual, i, r);
    float out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = c0 + k;
      const float scale = w ? invstd[c] * w[c] : invstd[c];
      float v;
      if (training) {
        const float xh = (xv[k] - mean[c]) * invstd[c];
        v = ((g[k] - sum_dy[c] * inv_rows) - xh * (sum_dyx[c] * inv_rows)) * scale;
      } else {
        v = g[k] * scale;
      }
      out[k] = residual ? v + r[k] : v;
    }
    if constexpr (V == 4)
      *reinterpret_cast<float4*>(dx + i) = make_float4(out[0], out[1], out[2], out[3]);
    else
      dx[i] = out[0];
  }
}

bool bn_vec4(int D, std::initializer_list<const void*> ptrs) {
  if (D % 4 != 0) return false;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

int bn_chunks(long long rows, const char* where) {
  const long long chunks = (rows + kColRows - 1) / kColRows;
  if (chunks > 65535) throw ValueError(str_cat(where, ": too many rows (", rows, ")"));
  return static_cast<int>(chunks);
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
  if (kind == NormKind::batchnorm) throw ValueError("sma::cuda::norm_forward: batchnorm is not a row norm (batchnorm_forward)");
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
                   const float* rstd, const float* dy, float* dx, float* dweight, float* dbias, void* stream,
                   const float* residual) {
  if (kind == NormKind::batchnorm)
    throw ValueError("sma::cuda::norm_backward: batchnorm is not a row norm (batchnorm_backward)");
  if (rows < 0 || D < 1) throw ValueError(str_cat("sma::cuda::norm_backward: bad sizes rows=", rows, " D=", D));
  if (rows == 0) return;
  if (!x || !dy || !dx || !rstd || (kind == NormKind::layernorm && !mean))
    throw ValueError("sma::cuda::norm_backward: x, dy, dx, rstd (and mean for layernorm) must not be null");
  const cudaStream_t s = as_stream(stream);
  const int threads = 32 * kWarpsPerBlock;
  norm_backward_kernel<<<detail::grid_for(rows * 32, threads), threads, 0, s>>>(
      static_cast<int>(kind), rows, D, x, weight, mean, rstd, dy, dx, residual);
  SMA_CUDA_CHECK_LAUNCH();
  const int mode = kind == NormKind::layernorm ? 1 : 2;
  if (dweight && weight) column_reduce(rows, D, dy, D, nullptr, mode, x, mean, rstd, dweight,
                                       kind == NormKind::scalenorm, s);
  if (dbias && kind == NormKind::layernorm) column_reduce(rows, D, dy, D, nullptr, 0, nullptr, nullptr, nullptr, dbias,
                                                          false, s);
}

void batchnorm_forward(long long rows, int D, float eps, bool training, float momentum, const float* x,
                       const float* weight, const float* bias, float* running_mean, float* running_var,
                       float* num_batches_tracked, float* y, float* mean, float* invstd, void* stream) {
  if (rows < 0 || D < 1) throw ValueError(str_cat("sma::cuda::batchnorm_forward: bad sizes rows=", rows, " D=", D));
  if (training && rows <= 1)
    throw ValueError(str_cat("sma::cuda::batchnorm_forward: train mode needs more than one value per channel, got ",
                             rows, " rows"));
  if (rows == 0) return;
  if (!x || !y || !mean || !invstd) throw ValueError("sma::cuda::batchnorm_forward: x, y, mean, invstd must not be null");
  if (!training && (!running_mean || !running_var))
    throw ValueError("sma::cuda::batchnorm_forward: eval mode needs running_mean and running_var");
  if ((weight == nullptr) != (bias == nullptr))
    throw ValueError("sma::cuda::batchnorm_forward: weight and bias must be both given or both null");
  const cudaStream_t s = as_stream(stream);
  const int bx = std::min(128, (D + 31) / 32 * 32);
  const int cgrid = (D + bx - 1) / bx;
  if (training) {
    const int chunks = bn_chunks(rows, "sma::cuda::batchnorm_forward");
    detail::StreamWorkspace ws(s);
    double* p1 = ws.alloc<double>(static_cast<long long>(chunks) * D);
    double* p2 = ws.alloc<double>(static_cast<long long>(chunks) * D);
    bn_partial_kernel<<<dim3((D + 31) / 32, chunks), dim3(32, kColGroups), 0, s>>>(0, rows, D, x, nullptr, nullptr,
                                                                                   nullptr, p1, p2);
    SMA_CUDA_CHECK_LAUNCH();
    bn_stats_kernel<<<(D + 7) / 8, 256, 0, s>>>(chunks, rows, D, eps, momentum, x, p1, p2, mean, invstd,
                                                running_mean, running_var, num_batches_tracked);
    SMA_CUDA_CHECK_LAUNCH();
  } else {
    bn_eval_stats_kernel<<<cgrid, bx, 0, s>>>(D, eps, running_mean, running_var, mean, invstd);
    SMA_CUDA_CHECK_LAUNCH();
  }
  const long long n = rows * D;
  if (bn_vec4(D, {x, y}))
    bn_apply_kernel<4><<<detail::grid_for(n / 4, 256), 256, 0, s>>>(n, D, x, mean, invstd, weight, bias, y);
  else
    bn_apply_kernel<1><<<detail::grid_for(n, 256), 256, 0, s>>>(n, D, x, mean, invstd, weight, bias, y);
  SMA_CUDA_CHECK_LAUNCH();
}

void batchnorm_backward(long long rows, int D, bool training, const float* x, const float* weight, const float* mean,
                        const float* invstd, const float* dy, float* dx, float* dweight, float* dbias, void* stream,
                        const float* residual) {
  if (rows < 0 || D < 1) throw ValueError(str_cat("sma::cuda::batchnorm_backward: bad sizes rows=", rows, " D=", D));
  if (rows == 0) return;
  if (!x || !mean || !invstd || !dy || !dx)
    throw ValueError("sma::cuda::batchnorm_backward: x, mean, invstd, dy, dx must not be null");
  const cudaStream_t s = as_stream(stream);
  const int chunks = bn_chunks(rows, "sma::cuda::batchnorm_backward");
  detail::StreamWorkspace ws(s);
  double* p1 = ws.alloc<double>(static_cast<long long>(chunks) * D);
  double* p2 = ws.alloc<double>(static_cast<long long>(chunks) * D);
  float* sums = ws.alloc<float>(2LL * D);
  bn_partial_kernel<<<dim3((D + 31) / 32, chunks), dim3(32, kColGroups), 0, s>>>(2, rows, D, x, dy, mean, invstd, p1,
                                                                                 p2);
  SMA_CUDA_CHECK_LAUNCH();
  bn_grad_sums_kernel<<<(D + 7) / 8, 256, 0, s>>>(chunks, D, p1, p2, sums, sums + D, weight ? dweight : nullptr,
                                           weight ? dbias : nullptr);
  SMA_CUDA_CHECK_LAUNCH();
  const long long n = rows * D;
  const float inv_rows = 1.f / static_cast<float>(rows);
  if (bn_vec4(D, {x, dy, residual, dx}))
    bn_dx_kernel<4><<<detail::grid_for(n / 4, 256), 256, 0, s>>>(n, D, inv_rows, training ? 1 : 0, x, mean, invstd,
                                                                 weight, sums, sums + D, dy, residual, dx);
  else
    bn_dx_kernel<1><<<detail::grid_for(n, 256), 256, 0, s>>>(n, D, inv_rows, training ? 1 : 0, x, mean, invstd,
                                                             weight, sums, sums + D, dy, residual, dx);
  SMA_CUDA_CHECK_LAUNCH();
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

void column_sum_add(long long rows, int cols, const float* a, int lda, const float* b, float* out, void* stream,
                    const int* bound) {
  if (rows <= 0 || cols <= 0) return;
  if (!a || !out || lda < cols) throw ValueError("sma::cuda::column_sum_add: null pointer or lda < cols");
  column_reduce(rows, cols, a, lda, b, 0, nullptr, nullptr, nullptr, out, false, as_stream(stream), bound);
}

void column_sums_add(long long rows, int cols, int n, const float* const* a, float* const* out, void* stream,
                     const int* bound) {
  if (rows <= 0 || cols <= 0 || n == 0) return;
  if (n < 0 || n > 4 || !a || !out)
    throw ValueError(str_cat("sma::cuda::column_sums_add: ", n, " matrices (1 to 4) or null pointer arrays"));
  ColumnSet set{};
  for (int i = 0; i < n; ++i) {
    if (!a[i] || !out[i]) throw ValueError(str_cat("sma::cuda::column_sums_add: matrix ", i, " or its output is null"));
    set.a[i] = a[i];
    set.out[i] = out[i];
  }
  const int chunks = static_cast<int>((rows + kColRows - 1) / kColRows);
  if (chunks > 65535) throw ValueError(str_cat("sma::cuda::column_sums_add: too many rows (", rows, ")"));
  const cudaStream_t s = as_stream(stream);
  detail::StreamWorkspace ws(s);
  double* part = ws.alloc<double>(static_cast<long long>(n) * chunks * cols);
  column_partial_set_kernel<<<dim3((cols + 31) / 32, chunks, n), dim3(32, kColGroups), 0, s>>>(rows, cols, set, bound,
                                                                                               part);
  SMA_CUDA_CHECK_LAUNCH();
  column_partials_finish(chunks, cols, n, part, out, s);
}

void column_partials_finish(int chunks, int cols, int n, const double* partial, float* const* out, void* stream) {
  if (chunks <= 0 || cols <= 0 || n == 0) return;
  if (n < 0 || n > 4 || !partial || !out)
    throw ValueError(str_cat("sma::cuda::column_partials_finish: ", n, " matrices (1 to 4) or null pointers"));
  ColumnSet set{};
  for (int i = 0; i < n; ++i) {
    if (!out[i]) throw ValueError(str_cat("sma::cuda::column_partials_finish: output ", i, " is null"));
    set.out[i] = out[i];
  }
  column_finish_set_kernel<<<(n * cols + 7) / 8, 256, 0, as_stream(stream)>>>(chunks, cols, n, partial, set);
  SMA_CUDA_CHECK_LAUNCH();
}

void column_sum_add_bf16(long long rows, int cols, const void* a16, int lda, float* out, void* stream,
                         const int* bound) {
  if (rows <= 0 || cols <= 0) return;
  if (!a16 || !out || lda < cols) throw ValueError("sma::cuda::column_sum_add_bf16: null pointer or lda < cols");
  column_reduce(rows, cols, static_cast<const __nv_bfloat16*>(a16), lda, nullptr, 0, nullptr, nullptr, nullptr, out,
                false, as_stream(stream), bound);
}

}  // namespace sma::cuda
