// SeqBoatLayerDevice (include/sma/cuda/seqboat_layer.hpp): the SeqBoat layer's forward and backward as a chain of
// device kernels and cuBLAS products, all on one stream, nothing waiting for the host (S stays on the device).
#include <sma/cuda/bounded_gemm.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/compress.hpp>
#include <sma/cuda/ema.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/local_attention.hpp>
#include <sma/cuda/seqboat_device.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/bf16_fill.cuh"
#include "../common/gemm.cuh"
#include "../common/site_mask.cuh"
#include "../common/workspace.cuh"
#include "padded_operands.cuh"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma::cuda {
namespace {

// Row-wise element kernels: blocks stride over rows, threads over columns (no 64-bit division per element).
constexpr int kRowThreads = 256;
unsigned row_grid(long long rows) { return static_cast<unsigned>(std::min<long long>(std::max<long long>(rows, 1), 1 << 18)); }

// base (rows, Z+2H) + bias -> q, k (rows, Z), r, v (rows, H): z = silu(.[:, :Z]), q = z g0 + b0, k = z g1 + b1.
// `base` holds the product without its bias; the bias is added here and again in the backward.
__device__ inline float ld_f(const float* p) { return *p; }
__device__ inline float ld_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// `bound` (device S, or nullptr): rows past it are left as they are (nothing downstream reads them). `base` is
// fp32, or bf16 on the bf16 path (the products' output, as autocast keeps it); r == nullptr: r is not stored
// (its consumers recompute it from base).
template <class TB>
__global__ void __launch_bounds__(kRowThreads) gau_act_kernel(long long rows, int Z, int H, const TB* __restrict__ base,
                                                              const float* __restrict__ bias,
                                                              const float* __restrict__ gamma,
                                                              const float* __restrict__ beta, float* __restrict__ q,
                                                              float* __restrict__ k, float* __restrict__ r,
                                                              float* __restrict__ v, const int* __restrict__ bound,
                                                              DropoutArgs hidden) {
  const int P = Z + 2 * H;
  const SiteMask vmask(hidden, DropoutSite::gau_v);
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const TB* br = base + row * P;
    for (int c = threadIdx.x; c < P; c += blockDim.x) {
      if (!r && c >= Z && c < Z + H) continue;
      const float b = ld_f(br + c) + bias[c];
      const float a = b / (1.f + expf(-b));
      if (c < Z) {
        q[row * Z + c] = a * gamma[c] + beta[c];
        k[row * Z + c] = a * gamma[Z + c] + beta[Z + c];
      } else if (c < Z + H) {
        r[row * H + (c - Z)] = a;
      } else {
        v[row * H + (c - Z - H)] = a * vmask(row * H + (c - Z - H));
      }
    }
  }
}

// dbase from dq, dk, d(att*r) = dhr, att, dv; tq = dq z, tk = dk z (for the gamma gradients). With dbase16
// (bf16 products) the gradient is written only as bf16, rows [bound, rows) as zeros, so the products over the
// B*L bound see exact zeros there; otherwise dbase in fp32 (every row: the fp32 products read them all).
template <class TB, class TG>
__global__ void __launch_bounds__(kRowThreads) gau_dbase_kernel(long long rows, int Z, int H,
                                                                const TB* __restrict__ base,
                                                                const float* __restrict__ bias,
                                                                const float* __restrict__ gamma,
                                                                const float* __restrict__ dq,
                                                                const float* __restrict__ dk,
                                                                const TG* __restrict__ dhr,
                                                                const float* __restrict__ att,
                                                                const float* __restrict__ dv, float* __restrict__ dbase,
                                                                __nv_bfloat16* __restrict__ dbase16,
                                                                float* __restrict__ tq, float* __restrict__ tk,
                                                                const int* __restrict__ bound, DropoutArgs hidden) {
  const int P = Z + 2 * H;
  const SiteMask vmask(hidden, DropoutSite::gau_v);
  const long long live = bound ? min(rows, static_cast<long long>(*bound)) : rows;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    if (row >= live) {
      for (int c = threadIdx.x; c < P; c += blockDim.x) dbase16[row * P + c] = __float2bfloat16_rn(0.f);
      continue;
    }
    for (int c = threadIdx.x; c < P; c += blockDim.x) {
      const long long i = row * P + c;
      const float b = ld_f(base + i) + bias[c];
      const float sg = 1.f / (1.f + expf(-b));
      const float dsilu = sg * (1.f + b * (1.f - sg));
      float d;
      if (c < Z) {
        const float z = b * sg;
        const float gq = dq[row * Z + c], gk = dk[row * Z + c];
        tq[row * Z + c] = gq * z;
        tk[row * Z + c] = gk * z;
        d = (gq * gamma[c] + gk * gamma[Z + c]) * dsilu;
      } else if (c < Z + H) {
        const long long j = row * H + (c - Z);
        d = ld_f(dhr + j) * att[j] * dsilu;
      } else {
        d = dv[row * H + (c - Z - H)] * vmask(row * H + (c - Z - H)) * dsilu;
      }
      if (dbase16)
        dbase16[i] = __float2bfloat16_rn(d);
      else
        dbase[i] = d;
    }
  }
}
// gau_dbase_kernel for the bf16 path on column pairs (Z and H even), a warp per row (padded_operands.cuh). The
// gamma and beta gradients' column sums (dq z, dk z, dq, dk over the compressed rows) are taken here instead of
// being written as tq, tk and summed again: each lane adds its columns over its warp's rows, the block adds its
// warps in order, and the block writes one double partial row per sum, gb_part[(i gridDim.x + block) Z + c] for
// i = dq z, dk z, dq, dk, which column_partials_finish adds in a fixed order. Z <= 128 (the layer's limit): a lane
// holds at most two column pairs of z.
__global__ void __launch_bounds__(kPaddedThreads) gau_dbase_bf16x2_kernel(
    long long rows, int Z, int H, const __nv_bfloat162* __restrict__ base16, const float* __restrict__ bias,
    const float* __restrict__ gamma, const float2* __restrict__ dq, const float2* __restrict__ dk,
    const __nv_bfloat162* __restrict__ dhr16, const float2* __restrict__ att, const float2* __restrict__ dv,
    __nv_bfloat162* __restrict__ dbase16, double* __restrict__ gb_part, const int* __restrict__ bound,
    DropoutArgs hidden) {
  constexpr int kZPairsPerLane = 2;  // Z <= 128: Z / 2 <= 64 pairs over 32 lanes
  __shared__ float warp_sums[kPaddedRows][4][128];
  const int P2 = (Z + 2 * H) / 2, Z2 = Z / 2, H2 = H / 2;
  const SiteMask vmask(hidden, DropoutSite::gau_v);
  const long long live = bound ? min(rows, static_cast<long long>(*bound)) : rows;
  const __nv_bfloat162 zero = __floats2bfloat162_rn(0.f, 0.f);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  float sums[4][kZPairsPerLane][2] = {};  // dq z, dk z, dq, dk for the lane's z column pairs
  // b (with the bias), silu'(b) and silu(b) of column pair c2 of a row.
  const auto act = [&](long long row, int c2, float (&b)[2], float (&ds)[2], float (&z)[2]) {
    const float2 b0 = __bfloat1622float2(base16[row * P2 + c2]);
    b[0] = b0.x + bias[2 * c2];
    b[1] = b0.y + bias[2 * c2 + 1];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float sg = 1.f / (1.f + expf(-b[e]));
      ds[e] = sg * (1.f + b[e] * (1.f - sg));
      z[e] = b[e] * sg;
    }
  };
  for (long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * blockDim.x / 32) {  // a warp per row (as padded_operands.cuh)
    if (row >= live) {
      for (int c2 = lane; c2 < P2; c2 += 32) dbase16[row * P2 + c2] = zero;
      continue;
    }
#pragma unroll
    for (int j = 0; j < kZPairsPerLane; ++j) {  // the z columns: constant register indices for the sums
      const int c2 = lane + 32 * j, c = 2 * c2;
      if (c2 >= Z2) continue;
      float b[2], ds[2], z[2];
      act(row, c2, b, ds, z);
      const float2 gq = dq[row * Z2 + c2], gk = dk[row * Z2 + c2];
      const float g[2][2] = {{gq.x, gq.y}, {gk.x, gk.y}};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sums[0][j][e] += g[0][e] * z[e];
        sums[1][j][e] += g[1][e] * z[e];
        sums[2][j][e] += g[0][e];
        sums[3][j][e] += g[1][e];
      }
      dbase16[row * P2 + c2] = __floats2bfloat162_rn((gq.x * gamma[c] + gk.x * gamma[Z + c]) * ds[0],
                                                     (gq.y * gamma[c + 1] + gk.y * gamma[Z + c + 1]) * ds[1]);
    }
    for (int c2 = Z2 + lane; c2 < P2; c2 += 32) {  // r and v
      float b[2], ds[2], z[2];
      act(row, c2, b, ds, z);
      float2 d;
      if (c2 < Z2 + H2) {
        const long long j = row * H2 + (c2 - Z2);
        const float2 g = __bfloat1622float2(dhr16[j]), a = att[j];
        d = make_float2(g.x * a.x * ds[0], g.y * a.y * ds[1]);
      } else {
        const long long j = row * H + 2 * (c2 - Z2 - H2);
        const float2 g = dv[row * H2 + (c2 - Z2 - H2)];
        d = make_float2(g.x * vmask(j) * ds[0], g.y * vmask(j + 1) * ds[1]);
      }
      dbase16[row * P2 + c2] = __floats2bfloat162_rn(d.x, d.y);
    }
  }
  // The block's sums: each warp its row of shared memory, then the warps added in order.
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kZPairsPerLane; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 2 * (lane + 32 * j) + e;
        if (c < Z) warp_sums[warp][i][c] = sums[i][j][e];
      }
  __syncthreads();
  for (int k = threadIdx.x; k < 4 * Z; k += blockDim.x) {
    const int i = k / Z, c = k - i * Z;
    double t = 0;
#pragma unroll
    for (int w = 0; w < kPaddedRows; ++w) t += warp_sums[w][i][c];
    gb_part[(static_cast<long long>(i) * gridDim.x + blockIdx.x) * Z + c] = t;
  }
}

__global__ void mul_kernel(long long n, const float* a, const float* b, float* out) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = a[i] * b[i];
}

// dst (rows, D) = src[:, off:off+D] of a (rows, ld) matrix (ld = 0: the same row, e.g. a bias, for every row).
__global__ void __launch_bounds__(kRowThreads) copy_cols_kernel(long long rows, int D, const float* __restrict__ src,
                                                                int ld, int off, float* __restrict__ dst, int ldd,
                                                                int offd) {
  for (long long r = blockIdx.x; r < rows; r += gridDim.x)
    for (int c = threadIdx.x; c < D; c += blockDim.x) dst[r * ldd + offd + c] = src[r * ld + off + c];
}

unsigned grid(long long n) { return detail::grid_for(n, 256); }


__global__ void to_bf16_kernel(long long n, const float* __restrict__ x, __nv_bfloat16* __restrict__ y) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

/// n floats -> bf16 into dst (or into a new `ws` buffer when dst is null); returns the copy.
const __nv_bfloat16* to_bf16(detail::StreamWorkspace& ws, cudaStream_t s, const float* src, long long n,
                             __nv_bfloat16* dst = nullptr) {
  if (!dst) dst = ws.alloc<__nv_bfloat16>(n);
  if (n > 0) {
    to_bf16_kernel<<<grid(n), 256, 0, s>>>(n, src, dst);
    SMA_CUDA_CHECK_LAUNCH();
  }
  return dst;
}

// The per-token kernels below take one warp per token row: lanes stride over the D channels (coalesced), and
// the row's slot comes from the plan's token -> slot map, so extraction needs no scatter pass of its own.
constexpr int kWarpRows = 8;  // warps (rows) per block
unsigned warp_grid(long long rows) { return detail::grid_for(rows, kWarpRows, 1LL << 20); }

// silu_f: padded_operands.cuh.
__device__ inline float dsilu_f(float v) {
  const float sg = 1.f / (1.f + expf(-v));
  return sg * (1.f + v * (1.f - sg));
}

// The fp32 path's SiLU with the mx site's dropout: mx = silu(e) * mask.
__global__ void silu_dropout_kernel(long long n, const float* __restrict__ e, float* __restrict__ mx, DropoutArgs dr) {
  const SiteMask mask(dr, DropoutSite::mx);
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    mx[i] = silu_f(e[i]) * mask(i);
}

// The bf16 path's SiLU: mx16 = bf16(silu(e)) and, in the same pass, the router's two logits in fp32 (the router
// decides on fp32 logits: in bf16 its probabilities round to ties), logits[t] = silu(e[t]) . w[0:2]^T + b[0:2].
// One warp per token row. With dropout, mx (and so the logits) is taken after the mx site's mask.
__global__ void silu_logits_kernel(long long rows, int D, const float* __restrict__ e, const float* __restrict__ w,
                                   const float* __restrict__ b, __nv_bfloat16* __restrict__ mx16,
                                   float* __restrict__ logits, DropoutArgs dr) {
  const int lane = threadIdx.x & 31;
  const SiteMask mask(dr, DropoutSite::mx);
  for (long long t = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; t < rows;
       t += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    float a0 = 0.f, a1 = 0.f;
    for (int c = lane; c < D; c += 32) {
      const float v = silu_f(e[t * D + c]) * mask(t * D + c);
      mx16[t * D + c] = __float2bfloat16_rn(v);
      a0 = fmaf(v, w[c], a0);
      a1 = fmaf(v, w[D + c], a1);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a0 += __shfl_xor_sync(0xffffffffu, a0, o);
      a1 += __shfl_xor_sync(0xffffffffu, a1, o);
    }
    if (lane == 0) {
      logits[2 * t] = a0 + b[0];
      logits[2 * t + 1] = a1 + b[1];
    }
  }
}

// xc16[s] = x16[token[s]] for s < S, zeros for S <= s < rows: compression straight into the bf16 operand.
__global__ void compress_bf16_kernel(long long rows, int D, const __nv_bfloat16* __restrict__ x16,
                                     const int* __restrict__ token, const int* __restrict__ bound,
                                     __nv_bfloat16* __restrict__ xc16) {
  const long long live = min(rows, static_cast<long long>(*bound));
  const int lane = threadIdx.x & 31;
  for (long long s = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; s < rows;
       s += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    __nv_bfloat16* dst = xc16 + s * D;
    if (s < live) {
      const __nv_bfloat16* src = x16 + static_cast<long long>(token[s]) * D;
      for (int c = lane; c < D; c += 32) dst[c] = src[c];
    } else {
      for (int c = lane; c < D; c += 32) dst[c] = __float2bfloat16_rn(0.f);
    }
  }
}

// out16 = bf16(a * r) on rows < S, zeros on [S, rows): the attention output times r, as the h_proj operand.
__global__ void mul_r_bf16_kernel(long long rows, int Z, int H, const float* __restrict__ a,
                                  const __nv_bfloat16* __restrict__ base16, const float* __restrict__ bias,
                                  const int* __restrict__ bound, __nv_bfloat16* __restrict__ out16) {
  const long long live = min(rows, static_cast<long long>(*bound));
  const int P = Z + 2 * H;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long o = row * H;
    for (int c = threadIdx.x; c < H; c += blockDim.x)
      out16[o + c] = __float2bfloat16_rn(row < live ? a[o + c] * r_of(base16, bias, row, P, Z, c) : 0.f);
  }
}

// Column-pair versions of the bf16 path's passes over the base (Z and H even): bf16x2 and float2 accesses.
__device__ inline float2 r2_of(const __nv_bfloat162* base2, const float* bias, long long row, int P2, int Z2,
                               int c2) {
  const float2 b = __bfloat1622float2(base2[row * P2 + Z2 + c2]);
  const int c = 2 * (Z2 + c2);
  const float b0 = b.x + bias[c], b1 = b.y + bias[c + 1];
  return make_float2(b0 / (1.f + expf(-b0)), b1 / (1.f + expf(-b1)));
}

__global__ void __launch_bounds__(kRowThreads) gau_act_bf16x2_kernel(
    long long rows, int Z, int H, const __nv_bfloat162* __restrict__ base2, const float* __restrict__ bias,
    const float* __restrict__ gamma, const float* __restrict__ beta, float2* __restrict__ q, float2* __restrict__ k,
    float2* __restrict__ v, const int* __restrict__ bound, DropoutArgs hidden) {
  const int Z2 = Z / 2, H2 = H / 2, P2 = Z2 + 2 * H2;
  const SiteMask vmask(hidden, DropoutSite::gau_v);
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  for (long long row = blockIdx.x; row < rows; row += gridDim.x)
    for (int j = threadIdx.x; j < Z2 + H2; j += blockDim.x) {  // the z and v columns (r is not stored)
      const int c2 = j < Z2 ? j : j + H2, c = 2 * c2;
      const float2 b0 = __bfloat1622float2(base2[row * P2 + c2]);
      const float b[2] = {b0.x + bias[c], b0.y + bias[c + 1]};
      const float a0 = b[0] / (1.f + expf(-b[0])), a1 = b[1] / (1.f + expf(-b[1]));
      if (j < Z2) {
        q[row * Z2 + j] = make_float2(a0 * gamma[c] + beta[c], a1 * gamma[c + 1] + beta[c + 1]);
        k[row * Z2 + j] = make_float2(a0 * gamma[Z + c] + beta[Z + c], a1 * gamma[Z + c + 1] + beta[Z + c + 1]);
      } else {
        const long long i = row * H + 2 * (j - Z2);
        v[row * H2 + (j - Z2)] = make_float2(a0 * vmask(i), a1 * vmask(i + 1));
      }
    }
}

__global__ void mul_r_bf16x2_kernel(long long rows, int Z, int H, const float2* __restrict__ a,
                                    const __nv_bfloat162* __restrict__ base2, const float* __restrict__ bias,
                                    const int* __restrict__ bound, __nv_bfloat162* __restrict__ out2) {
  const long long live = min(rows, static_cast<long long>(*bound));
  const int Z2 = Z / 2, H2 = H / 2, P2 = Z2 + 2 * H2;
  const int lane = threadIdx.x & 31;
  for (long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * blockDim.x / 32) {  // a warp per row (as padded_operands.cuh)
    const long long o = row * H2;
    for (int c2 = lane; c2 < H2; c2 += 32) {
      if (row >= live) {
        out2[o + c2] = __floats2bfloat162_rn(0.f, 0.f);
        continue;
      }
      const float2 x = a[o + c2], r = r2_of(base2, bias, row, P2, Z2, c2);
      out2[o + c2] = __floats2bfloat162_rn(x.x * r.x, x.y * r.y);
    }
  }
}

__global__ void mul_r_x2_kernel(long long rows, int Z, int H, const __nv_bfloat162* __restrict__ a,
                                const __nv_bfloat162* __restrict__ base2, const float* __restrict__ bias,
                                const int* __restrict__ bound, float2* __restrict__ out) {
  const long long live = bound ? min(rows, static_cast<long long>(*bound)) : rows;
  const int Z2 = Z / 2, H2 = H / 2, P2 = Z2 + 2 * H2;
  for (long long row = blockIdx.x; row < live; row += gridDim.x) {
    const long long o = row * H2;
    for (int c2 = threadIdx.x; c2 < H2; c2 += blockDim.x) {
      const float2 x = __bfloat1622float2(a[o + c2]), r = r2_of(base2, bias, row, P2, Z2, c2);
      out[o + c2] = make_float2(x.x * r.x, x.y * r.y);
    }
  }
}

// out = a * r on rows < min(rows, *bound) (fp32 out; the bf16 path's datt = dhr r, dhr in bf16).
__global__ void mul_r_kernel(long long rows, int Z, int H, const __nv_bfloat16* __restrict__ a,
                             const __nv_bfloat16* __restrict__ base16, const float* __restrict__ bias,
                             const int* __restrict__ bound, float* __restrict__ out) {
  const long long live = bound ? min(rows, static_cast<long long>(*bound)) : rows;
  const int P = Z + 2 * H;
  for (long long row = blockIdx.x; row < live; row += gridDim.x) {
    const long long o = row * H;
    for (int c = threadIdx.x; c < H; c += blockDim.x)
      out[o + c] = __bfloat162float(a[o + c]) * r_of(base16, bias, row, P, Z, c);
  }
}

// V consecutive floats of a row, as one float4 / float2 access when V is 4 / 2 (the caller checks alignment).
template <int V>
__device__ __forceinline__ void load_v(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else if constexpr (V == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  } else {
    v[0] = *p;
  }
}
template <int V>
__device__ __forceinline__ void store_v(float* p, const float (&v)[V]) {
  if constexpr (V == 4)
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else if constexpr (V == 2)
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  else
    *p = v[0];
}
template <int V>
__device__ __forceinline__ void store_bf16_v(__nv_bfloat16* p, const float (&v)[V]) {
  if constexpr (V == 4) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<const unsigned*>(&lo);
    u.y = *reinterpret_cast<const unsigned*>(&hi);
    *reinterpret_cast<uint2*>(p) = u;
  } else if constexpr (V == 2) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
  } else {
    *p = __float2bfloat16_rn(v[0]);
  }
}

// The layer's output, per token t: pre = hx[t] (row stride ldh; + hx_bias: the bf16 path's product has none) + gate *
// (hc[slot] + h_bias) (activated tokens) + x[t]; out = silu(pre). Replaces the bias copy, extract_add and the
// residual pass. One warp per token, V consecutive columns per lane and step (token_width: V divides D and ldh, and
// every row start is aligned to V floats). Dropout: on hc + h_bias (bidirectional) or on hx + gate * h (causal).
template <int V>
__global__ void output_kernel(long long rows, int D, int ldh, const float* __restrict__ x, const float* __restrict__ hx,
                              const float* __restrict__ hxbias, const float* __restrict__ hc,
                              const float* __restrict__ hbias,
                              const float* __restrict__ gate, const int* __restrict__ slot_of,
                              const std::uint8_t* __restrict__ key_valid, float* __restrict__ pre,
                              float* __restrict__ out, DropoutArgs dr, bool causal) {
  const int lane = threadIdx.x & 31;
  const SiteMask mask(dr, causal ? DropoutSite::sum : DropoutSite::hc);
  for (long long t = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; t < rows;
       t += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int slot = slot_of[t];
    const bool on = slot >= 0 && key_valid[slot] != 0;
    const float g = on ? gate[t] : 0.f;
    const float* hr = hx + t * ldh;
    const float* hcr = on ? hc + static_cast<long long>(slot) * D : nullptr;
    for (int c = V * lane; c < D; c += 32 * V) {
      float p[V], b[V], xv[V], y[V];
      load_v<V>(hr + c, p);
      if (hxbias) {
        load_v<V>(hxbias + c, b);
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] += b[k];
      }
      if (on) {
        float h[V];
        load_v<V>(hcr + c, h);
        load_v<V>(hbias + c, b);
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] += g * ((h[k] + b[k]) * (causal ? 1.f : mask(t * D + c + k)));
      }
      load_v<V>(x + t * D + c, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (causal) p[k] *= mask(t * D + c + k);
        p[k] += xv[k];
        y[k] = silu_f(p[k]);
      }
      store_v<V>(pre + t * D + c, p);
      store_v<V>(out + t * D + c, y);
    }
  }
}

// Backward of output_kernel (and of the extraction), per token t: dpre = dact silu'(pre); for an activated token
// dhc[slot] = gate dpre and dgate = <dpre, hc[slot] + h_bias>; dgate = 0 otherwise (dgate is read only for
// activated tokens). dpre also goes to hx's gradient (dhu, row stride ldh, already offset to hx's columns), in fp32
// or bf16. With dhc16 the slot gradient is written as bf16 only (rows past S are zeroed separately). V as in
// output_kernel. Dropout (output_kernel's masks re-derived): hx's gradient is dsum = dpre * mask (causal; dpre
// itself stays the residual's), also written to `dsum` when given; dhc and dgate take the hc mask (bidirectional).
template <int V>
__global__ void output_backward_kernel(long long rows, int D, int ldh, const float* __restrict__ pre,
                                       const float* __restrict__ dact, const float* __restrict__ hc,
                                       const float* __restrict__ hbias, const float* __restrict__ gate,
                                       const int* __restrict__ slot_of, const std::uint8_t* __restrict__ key_valid,
                                       float* __restrict__ dpre, float* __restrict__ dgate, float* __restrict__ dhc,
                                       __nv_bfloat16* __restrict__ dhc16, float* __restrict__ dhu,
                                       __nv_bfloat16* __restrict__ dhu16, DropoutArgs dr, bool causal,
                                       float* __restrict__ dsum) {
  const int lane = threadIdx.x & 31;
  const SiteMask mask(dr, causal ? DropoutSite::sum : DropoutSite::hc);
  for (long long t = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; t < rows;
       t += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int slot = slot_of[t];
    const bool on = slot >= 0 && key_valid[slot] != 0;
    const float g = gate[t];
    const long long so = static_cast<long long>(slot) * D;
    double acc = 0;  // dgate feeds the router's temperature gradient, a sum with cancellation: keep it exact
    for (int c = V * lane; c < D; c += 32 * V) {
      const long long i = t * D + c;
      float d[V], pv[V];
      load_v<V>(dact + i, d);
      load_v<V>(pre + i, pv);
#pragma unroll
      for (int k = 0; k < V; ++k) d[k] *= dsilu_f(pv[k]);
      store_v<V>(dpre + i, d);
      float hm[V];  // the hc mask (bidirectional dropout), 1 otherwise
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (causal) d[k] *= mask(i + k);  // from here d is dsum
        hm[k] = causal ? 1.f : mask(i + k);
      }
      if (dsum) store_v<V>(dsum + i, d);
      if (dhu16)
        store_bf16_v<V>(dhu16 + t * ldh + c, d);
      else
        store_v<V>(dhu + t * ldh + c, d);
      if (slot >= 0) {  // slots of inactive tokens (the uncompressed fallback) get a zero gradient
        float v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = on ? g * d[k] * hm[k] : 0.f;
        if (dhc16)
          store_bf16_v<V>(dhc16 + so + c, v);
        else
          store_v<V>(dhc + so + c, v);
      }
      if (on) {
        float h[V], b[V];
        load_v<V>(hc + so + c, h);
        load_v<V>(hbias + c, b);
#pragma unroll
        for (int k = 0; k < V; ++k)
          acc = fma(static_cast<double>(d[k]) * hm[k], static_cast<double>(h[k]) + b[k], acc);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) dgate[t] = on ? static_cast<float>(acc) : 0.f;
  }
}

// Zeros for rows [S, rows) of a (rows, cols) bf16 matrix with row stride cols: the tail is one contiguous range.
__global__ void zero_tail_bf16_kernel(long long rows, int cols, const int* __restrict__ bound,
                                      __nv_bfloat16* __restrict__ dst) {
  detail::zero_bf16_range(dst, min(rows, static_cast<long long>(*bound)) * cols, rows * cols,
                          blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x,
                          static_cast<long long>(gridDim.x) * blockDim.x);
}

// dlogits (rows, 2) into columns 0..1 of the bf16 hx_proj gradient.
__global__ void logits_to_bf16_kernel(long long rows, int ld, const float* __restrict__ dlogits,
                                      __nv_bfloat16* __restrict__ dhu16) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < 2 * rows;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    dhu16[(i / 2) * ld + (i % 2)] = __float2bfloat16_rn(dlogits[i]);
}

// dmx = (dmx + dxc[slot] [+ dlogits[t] W[0:2]]) silu'(e) per token: the compression's backward, the router
// logits' share of hx_proj's backward (bf16 path: a rank-2 product, cheaper here than as a product of its own)
// and the SiLU's in one pass, through the mx site's dropout mask when there is one. V as in output_kernel.
template <int V>
__global__ void dmx_kernel(long long rows, int D, const float* __restrict__ e, const float* __restrict__ dxc,
                           const int* __restrict__ slot_of, const float* __restrict__ dlogits,
                           const float* __restrict__ w2, float* __restrict__ dmx, DropoutArgs dr) {
  const int lane = threadIdx.x & 31;
  const SiteMask mask(dr, DropoutSite::mx);
  for (long long t = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32; t < rows;
       t += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int slot = slot_of[t];
    const float* g = slot >= 0 ? dxc + static_cast<long long>(slot) * D : nullptr;
    const float l0 = dlogits ? dlogits[2 * t] : 0.f, l1 = dlogits ? dlogits[2 * t + 1] : 0.f;
    for (int c = V * lane; c < D; c += 32 * V) {
      const long long i = t * D + c;
      float v[V], ev[V];
      load_v<V>(dmx + i, v);
      if (g) {
        float gv[V];
        load_v<V>(g + c, gv);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] += gv[k];
      }
      if (dlogits) {
        float w0[V], w1[V];
        load_v<V>(w2 + c, w0);
        load_v<V>(w2 + D + c, w1);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] += l0 * w0[k] + l1 * w1[k];
      }
      load_v<V>(e + i, ev);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] *= mask(i + k) * dsilu_f(ev[k]);
      store_v<V>(dmx + i, v);
    }
  }
}

// The widest V in {4, 2, 1} for the per-token kernels: V divides D and every leading dimension, and every pointer
// is aligned to V elements (V floats for fp32 pointers, V bf16 for bf16 ones).
int token_width(int D, std::initializer_list<long long> lds, std::initializer_list<const float*> f32,
                std::initializer_list<const __nv_bfloat16*> b16 = {}) {
  for (int v : {4, 2}) {
    bool ok = D % v == 0;
    for (long long ld : lds) ok = ok && ld % v == 0;
    for (const float* p : f32) ok = ok && reinterpret_cast<std::uintptr_t>(p) % (4u * v) == 0;
    for (const __nv_bfloat16* p : b16) ok = ok && reinterpret_cast<std::uintptr_t>(p) % (2u * v) == 0;
    if (ok) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>{}) for V = width (4, 2 or 1), to launch a kernel template<int V>.
template <class F>
void with_width(int width, F&& f) {
  if (width == 4)
    f(std::integral_constant<int, 4>{});
  else if (width == 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, 1>{});
}

/// gemm_rm for contiguous operands (ld = columns), optionally with bf16 copies of A and B and fp32 accumulation
/// and output on the tensor cores. a16 / b16: bf16 copies already made (reused across products), else converted
/// here into `ws`.
void gemm_proj(cublasHandle_t h, bool bf16, detail::StreamWorkspace& ws, cudaStream_t s, bool ta, bool tb, int M,
               int N, int K, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc,
               const __nv_bfloat16* a16 = nullptr, const __nv_bfloat16* b16 = nullptr) {
  if (!bf16) return detail::gemm_rm(h, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (M <= 0 || N <= 0 || (K <= 0 && beta == 1.f)) return;
  if (!a16) a16 = to_bf16(ws, s, A, static_cast<long long>(M) * K);
  if (!b16) b16 = to_bf16(ws, s, B, static_cast<long long>(N) * K);
  const float alpha = 1.f;
  SMA_CUDA_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, b16,
                              CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
}

/// Row-major C16 (M x N, bf16) = op(A16) op(B16) on the tensor cores, fp32 accumulation (the GAU's base on the bf16
/// path: stored in bf16, as autocast keeps a linear layer's output).
void gemm_bf16_out(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, const __nv_bfloat16* a16, int lda,
                   const __nv_bfloat16* b16, int ldb, __nv_bfloat16* c16, int ldc) {
  if (M <= 0 || N <= 0) return;
  const float alpha = 1.f, beta = 0.f;
  SMA_CUDA_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, b16,
                              CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda, &beta, c16, CUDA_R_16BF, ldc,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

struct SeqBoatLayerDevice::Impl {
  SeqBoatDeviceConfig cfg;
  cublasHandle_t blas = nullptr;
  std::vector<std::string> names;
  std::map<std::string, DeviceArray<float>> value, grad;

  // Shapes of the last forward and what backward reads.
  int B = 0, L = 0;
  long long rows_c = 0;  ///< rows the products after compression ran on: B*L, or S with host_compressed_length
  bool has_forward = false, has_padding = false;
  bool bn_batch_stats = false;  ///< the last forward's batchnorm used batch statistics (train mode)
  DeviceArray<float> bn_mean, bn_invstd, bn_mean2, bn_invstd2;  ///< (D) batchnorm statistics of the pre / post norm
  std::unique_ptr<DeviceCompression> plan;
  DeviceArray<float> logits;  ///< (N, 2) the router's fp32 logits on the bf16 path (in hu on the fp32 path)
  DeviceArray<float> x, xin, mean, rstd, ema_out, mx, hu, probs, gate, xc, base, q, k, r, v, att, row_stat, hr, hc,
      pre, act, mean2, rstd2;
  DeviceArray<std::uint8_t> padding, active;
  DeviceBuffer mx16, xc16, hr16;  ///< bf16 copies of the projections' inputs (bf16_projections), for the backward
  DeviceBuffer base16;            ///< the GAU's base (rows, Z+2H) in bf16 on the bf16 path (r is not stored there)
  // The bf16 path's weight copies (made in each forward, used by its backward) and backward operands. They live
  // as long as the layer because the bounded products' graphs are keyed by their pointers (bounded_gemm.hpp).
  DeviceBuffer w_mx16, w_h16, dhc16, dhr16, dbase16, dxc;
  // The bf16 attention's padded operands (SeqBoatDeviceConfig::padded_attention_operands): written by the
  // activation pass (q, k, v) and the backward's dout pass, kept across calls (stable pointers for the attention's
  // graphs). Rows [0, W') are zeroed once per layout and never written again.
  DeviceBuffer qp16, kp16, vp16, dop16;
  PaddedLayout pad_layout;          ///< the layout they were zeroed for (0 rows: not yet)
  bool padded_attention = false;    ///< the last forward used them (its backward does too)
  DeviceArray<std::uint64_t> draw{1};  ///< the dropout draw counter (sma/cuda/dropout.hpp)
  bool dropout_on = false;             ///< the last forward drew masks (its backward re-derives them)

  /// The last forward's dropout (and the GAU's hidden dropout) for the kernels (no draw pointer: none).
  DropoutArgs dropout_args() const {
    return dropout_on ? cuda::dropout_args(cfg.dropout_seed, draw.data(), cfg.dropout) : DropoutArgs{};
  }
  DropoutArgs hidden_args() const {
    return dropout_on ? cuda::dropout_args(cfg.dropout_seed, draw.data(), cfg.hidden_dropout) : DropoutArgs{};
  }
  /// The attention's configuration for the last forward: its attention dropout seeded from the layer's seed and
  /// draw counter (LocalAttentionConfig::dropout_draw), or none.
  LocalAttentionConfig attention_config() const {
    LocalAttentionConfig a = cfg.attention;
    if (dropout_on && a.dropout > 0) {
      a.dropout_seed = cfg.dropout_seed;
      a.dropout_draw = draw.data();
    } else {
      a.dropout = 0;
    }
    return a;
  }

  /// A product over the compressed rows on the bf16 path, bounded by the device's S (bounded_gemm: the chunks of
  /// rows past S are skipped, with no host wait).
  static BoundedGemm rows_product(bool tb, int M, int N, int K, const void* a, int lda, const void* b, int ldb,
                                  void* c, int ldc, GemmType c_type) {
    BoundedGemm g = bf16_product(false, tb, M, N, K, a, lda, b, ldb, c, ldc);
    g.c_type = c_type;
    return g;
  }

  /// n elements of T in b, grown when too small (kept across calls: stable pointers).
  template <class T = __nv_bfloat16>
  static T* held(DeviceBuffer& b, long long n) {
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    if (b.bytes() < bytes) b = DeviceBuffer(bytes);
    return static_cast<T*>(b.data());
  }

  ~Impl() {
    if (blas) cublasDestroy(blas);
  }

  /// The padded operands for `lay`, zeroed whole when the layout differs from the one they hold.
  void ensure_padded(const PaddedLayout& lay, cudaStream_t s) {
    if (lay.rows == pad_layout.rows && lay.offset == pad_layout.offset) return;
    const long long Z = cfg.zdim, H = cfg.hdim;
    for (const auto& [b, w] : {std::pair<DeviceBuffer*, long long>{&qp16, Z}, {&kp16, Z}, {&vp16, H}, {&dop16, H}}) {
      held(*b, lay.rows * w);
      SMA_CUDA_CHECK(cudaMemsetAsync(b->data(), 0, b->bytes(), s));
    }
    pad_layout = lay;
  }

  const float* p(const char* n) const {
    auto it = value.find(n);
    return it == value.end() ? nullptr : it->second.data();
  }
  float* g(const char* n) const {
    auto it = grad.find(n);
    return it == grad.end() ? nullptr : it->second.data();
  }
  const float* norm_weight() const {
    return cfg.norm == NormKind::scalenorm ? p("norm.norm.scalar") : p("norm.norm.weight");
  }
  float* norm_dweight() const {
    return cfg.norm == NormKind::scalenorm ? g("norm.norm.scalar") : g("norm.norm.weight");
  }
  float* pm(const char* n) const { return const_cast<float*>(p(n)); }
  /// The layer's norm, forward: per-row statistics into mean / rstd (N), batchnorm's into bm / bi (D).
  void norm_fwd(long long N, const float* in, float* out, float* mean_, float* rstd_, float* bm, float* bi,
                cudaStream_t s) {
    if (cfg.norm == NormKind::batchnorm) {
      const bool tr = cfg.training;
      batchnorm_forward(N, cfg.embed_dim, cfg.norm_eps, tr, cfg.norm_momentum, in, p("norm.norm.weight"),
                        p("norm.norm.bias"), pm("norm.norm.running_mean"), pm("norm.norm.running_var"),
                        tr ? pm("norm.norm.num_batches_tracked") : nullptr, out, bm, bi, s);
    } else {
      norm_forward(cfg.norm, N, cfg.embed_dim, cfg.norm_eps, in, norm_weight(), p("norm.norm.bias"), out, mean_, rstd_,
                   s);
    }
  }
  void norm_bwd(long long N, const float* in, const float* mean_, const float* rstd_, const float* bm, const float* bi,
                const float* dy, float* dx, cudaStream_t s, const float* residual = nullptr) {
    if (cfg.norm == NormKind::batchnorm) {
      batchnorm_backward(N, cfg.embed_dim, bn_batch_stats, in, p("norm.norm.weight"), bm, bi, dy, dx,
                         g("norm.norm.weight"), g("norm.norm.bias"), s, residual);
    } else {
      norm_backward(cfg.norm, N, cfg.embed_dim, in, norm_weight(), mean_, rstd_, dy, dx, norm_dweight(),
                    g("norm.norm.bias"), s, residual);
    }
  }
  EmaConfig ema_cfg() const {
    EmaConfig e;
    e.batch = B;
    e.length = L;
    e.dim = cfg.embed_dim;
    e.order = cfg.ndim;
    e.bidirectional = cfg.bidirectional;
    e.truncation = cfg.truncation;
    return e;
  }
  EmaParams ema_params() const {
    return {p("ssm.delta"), p("ssm.alpha"), p("ssm.beta"), p("ssm.gamma"), p("ssm.omega")};
  }
  LocalAttentionInputs attention_inputs() const {
    LocalAttentionInputs in;
    in.batch = B;
    in.capacity = B * L;
    in.z = cfg.zdim;
    in.h = cfg.hdim;
    const CompressionView pv = plan->view();
    in.offsets = pv.offsets;
    in.positions = pv.positions;
    in.key_valid = pv.key_valid;
    if (padded_attention) {  // fp32 q, k, v are not written then
      in.q_padded = qp16.data();
      in.k_padded = kp16.data();
      in.v_padded = vp16.data();
    } else {
      in.q = q.data();
      in.k = k.data();
      in.v = v.data();
    }
    return in;
  }

  /// Row stride of hu = [router logits | hx] and of its gradient: 2 + D rounded up to 8 elements, so that rows
  /// start 16-byte aligned and cuBLAS can pick its fast kernels for the hx_proj products (an odd stride such as
  /// 514 sends them to slow 4-byte-aligned ones).
  int ldh() const { return (2 + cfg.embed_dim + 7) / 8 * 8; }

  static void ensure(DeviceArray<float>& a, long long n) {
    if (static_cast<long long>(a.size()) != n) a = DeviceArray<float>(static_cast<std::size_t>(n));
  }

  /// fp32 q, k, v (N rows): written and read only when the attention does not take the padded operands.
  void ensure_qkv() {
    const long long N = static_cast<long long>(B) * L, Z = cfg.zdim, H = cfg.hdim;
    ensure(q, N * Z);
    ensure(k, N * Z);
    ensure(v, N * H);
  }

  void ensure_fp32() {
    const long long N = static_cast<long long>(B) * L, D = cfg.embed_dim, Z = cfg.zdim, H = cfg.hdim;
    ensure(mx, N * D);
    ensure(xc, N * D);
    ensure(base, N * (Z + 2 * H));
    ensure(r, N * H);
    ensure(hr, N * H);
  }

  void allocate(int b, int l) {
    if (b == B && l == L && plan) return;
    B = b;
    L = l;
    const long long N = static_cast<long long>(B) * L, D = cfg.embed_dim, H = cfg.hdim;
    plan = std::make_unique<DeviceCompression>(B, L);
    for (auto* a : {&x, &xin, &ema_out, &hc, &pre, &act}) ensure(*a, N * D);
    ensure(logits, N * 2);
    for (auto* a : {&mean, &rstd, &gate, &row_stat, &mean2, &rstd2}) ensure(*a, N);
    for (auto* a : {&bn_mean, &bn_invstd, &bn_mean2, &bn_invstd2}) ensure(*a, D);
    ensure(hu, N * ldh());
    ensure(probs, N * 2);
    ensure(att, N * H);
    // mx, xc, base, r, hr: the fp32 path's only (ensure_fp32); the bf16 path keeps bf16 copies instead. q, k, v:
    // ensure_qkv.
    padding = DeviceArray<std::uint8_t>(static_cast<std::size_t>(N));
    active = DeviceArray<std::uint8_t>(static_cast<std::size_t>(N));
  }
};

SeqBoatLayerDevice::SeqBoatLayerDevice(const SeqBoatDeviceConfig& cfg,
                                       const std::vector<std::pair<std::string, std::vector<float>>>& params)
    : impl_(std::make_unique<Impl>()) {
  if (cfg.embed_dim < 1 || cfg.zdim < 1 || cfg.hdim < 1 || cfg.ndim < 1)
    throw ValueError(str_cat("SeqBoatLayerDevice: embed_dim, zdim, hdim, ndim must be >= 1, got ", cfg.embed_dim,
                             ", ", cfg.zdim, ", ", cfg.hdim, ", ", cfg.ndim));
  if (cfg.zdim > 128) throw ValueError(str_cat("SeqBoatLayerDevice: zdim ", cfg.zdim, " > 128 is not supported"));
  impl_->cfg = cfg;
  // For timing the padded operands against the attention's own pad passes without a rebuild (e.g. in the model,
  // whose layers take the default): SMA_CUDA_PADDED_ATTENTION=0 turns them off.
  if (const char* e = std::getenv("SMA_CUDA_PADDED_ATTENTION"))
    impl_->cfg.padded_attention_operands = std::atoi(e) != 0;
  const long long D = cfg.embed_dim, Z = cfg.zdim, H = cfg.hdim, R = cfg.bidirectional ? 2 * D : D;
  const std::map<std::string, long long> expected = {
      {"ssm.delta", R * cfg.ndim}, {"ssm.alpha", R * cfg.ndim}, {"ssm.beta", R * cfg.ndim},
      {"ssm.gamma", R * cfg.ndim}, {"ssm.omega", D},            {"hx_proj.weight", (2 + D) * D},
      {"hx_proj.bias", 2 + D},     {"q_router.temp", 1},        {"mx_proj.weight", (Z + 2 * H) * D},
      {"mx_proj.bias", Z + 2 * H}, {"h_proj.weight", D * H},    {"h_proj.bias", D},
      {"gamma", 2 * Z},            {"beta", 2 * Z}};
  for (const auto& [name, vals] : params) {
    auto it = expected.find(name);
    if (it != expected.end() && static_cast<long long>(vals.size()) != it->second)
      throw ShapeError(str_cat("SeqBoatLayerDevice: parameter ", name, " has ", vals.size(), " values, expected ",
                               it->second));
    impl_->names.push_back(name);
    impl_->value.emplace(name, DeviceArray<float>(vals));
    impl_->grad.emplace(name, DeviceArray<float>(std::vector<float>(vals.size(), 0.f)));
  }
  for (const auto& [name, n] : expected)
    if (!impl_->value.count(name)) throw ValueError(str_cat("SeqBoatLayerDevice: parameter ", name, " is missing"));
  if (cfg.norm == NormKind::batchnorm)
    for (const char* name : {"norm.norm.running_mean", "norm.norm.running_var"}) {
      auto it = impl_->value.find(name);
      if (it == impl_->value.end() || static_cast<long long>(it->second.size()) != D)
        throw ValueError(str_cat("SeqBoatLayerDevice: batchnorm needs the buffer ", name, " of ", D, " values"));
    }
  const int table = cfg.attention.bias_table_size();
  if (table > 0) {
    auto it = impl_->value.find("rel_pos_bias.rel_pos_bias");
    if (it == impl_->value.end() || static_cast<int>(it->second.size()) != table)
      throw ShapeError(str_cat("SeqBoatLayerDevice: rel_pos_bias.rel_pos_bias must have ", table, " values"));
  }
  if (!(cfg.dropout >= 0.f && cfg.dropout < 1.f) || !(cfg.hidden_dropout >= 0.f && cfg.hidden_dropout < 1.f) ||
      !(cfg.attention.dropout >= 0 && cfg.attention.dropout < 1))
    throw ValueError(str_cat("SeqBoatLayerDevice: dropout, hidden_dropout and attention.dropout must be in [0, 1), got ",
                             cfg.dropout, ", ", cfg.hidden_dropout, " and ", cfg.attention.dropout));
  impl_->draw.fill_bytes(0);
  SMA_CUDA_CHECK(cublasCreate(&impl_->blas));
}

SeqBoatLayerDevice::~SeqBoatLayerDevice() = default;
SeqBoatLayerDevice::SeqBoatLayerDevice(SeqBoatLayerDevice&&) noexcept = default;
SeqBoatLayerDevice& SeqBoatLayerDevice::operator=(SeqBoatLayerDevice&&) noexcept = default;

const SeqBoatDeviceConfig& SeqBoatLayerDevice::config() const { return impl_->cfg; }
void SeqBoatLayerDevice::set_router_shift(float shift) { impl_->cfg.router_shift = shift; }
void SeqBoatLayerDevice::set_host_compressed_length(bool on) {
  if (on != impl_->cfg.host_compressed_length) impl_->has_forward = false;  // backward needs the forward's rows
  impl_->cfg.host_compressed_length = on;
}
void SeqBoatLayerDevice::set_training(bool on) { impl_->cfg.training = on; }
void SeqBoatLayerDevice::set_dropout_seed(std::uint64_t seed, void* stream) {
  impl_->cfg.dropout_seed = seed;
  impl_->draw.fill_bytes(0, stream);
}
std::uint64_t SeqBoatLayerDevice::dropout_draw(void* stream) const { return impl_->draw.download(stream)[0]; }
void SeqBoatLayerDevice::set_bf16_attention(bool on) {
  if (impl_->has_forward && on != impl_->cfg.attention.bf16) impl_->has_forward = false;  // no mixed backward
  impl_->cfg.attention.bf16 = on;
}
bool SeqBoatLayerDevice::training() const { return impl_->cfg.training; }
void SeqBoatLayerDevice::set_padded_attention_operands(bool on) {
  if (impl_->has_forward && on != impl_->cfg.padded_attention_operands) impl_->has_forward = false;
  impl_->cfg.padded_attention_operands = on;
}
void SeqBoatLayerDevice::set_bf16_projections(bool on) {
  if (impl_->has_forward && on != impl_->cfg.bf16_projections) impl_->has_forward = false;  // no mixed backward
  impl_->cfg.bf16_projections = on;
}

void SeqBoatLayerDevice::forward(int batch, int length, const float* x, const std::uint8_t* padding, float* out,
                                 void* stream) {
  if (batch < 0 || length < 0)
    throw ValueError(str_cat("SeqBoatLayerDevice::forward: negative batch ", batch, " or length ", length));
  if (batch > 0 && length > 0 && (!x || !out)) throw ValueError("SeqBoatLayerDevice::forward: x or out is null");
  if (static_cast<long long>(batch) * length > 0x7fffffffLL)
    throw ValueError(str_cat("SeqBoatLayerDevice::forward: B*L = ", static_cast<long long>(batch) * length,
                             " tokens exceed the 32-bit slot indices"));
  Impl& m = *impl_;
  const SeqBoatDeviceConfig& c = m.cfg;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  m.has_forward = false;
  m.allocate(batch, length);
  const long long N = static_cast<long long>(batch) * length;
  if (N == 0) {
    m.has_forward = true;
    return;
  }
  const int D = c.embed_dim, Z = c.zdim, H = c.hdim, P = Z + 2 * H;
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  detail::StreamWorkspace ws(s);
  const bool bf = c.bf16_projections;
  const bool pairs = bf && Z % 2 == 0 && H % 2 == 0;  // the bf16 passes over the base on column pairs
  if (!bf) m.ensure_fp32();
  SMA_CUDA_CHECK(cudaMemcpyAsync(m.x.data(), x, N * D * sizeof(float), cudaMemcpyDeviceToDevice, s));
  m.has_padding = padding != nullptr;
  if (padding) SMA_CUDA_CHECK(cudaMemcpyAsync(m.padding.data(), padding, N, cudaMemcpyDeviceToDevice, s));
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  m.dropout_on = c.training && (c.dropout > 0.f || c.hidden_dropout > 0.f || c.attention.dropout > 0);
  if (m.dropout_on) {
    advance_draw_kernel<<<1, 1, 0, s>>>(m.draw.data());
    SMA_CUDA_CHECK_LAUNCH();
  }
  const DropoutArgs dr = m.dropout_args();

  // 1. pre-norm, EMA, SiLU.
  const float* xin = m.x.data();
  m.bn_batch_stats = c.training;
  if (c.prenorm) {
    m.norm_fwd(N, m.x.data(), m.xin.data(), m.mean.data(), m.rstd.data(), m.bn_mean.data(), m.bn_invstd.data(), s);
    xin = m.xin.data();
  }
  ema_forward(m.ema_cfg(), m.ema_params(), xin, pad, m.ema_out.data(), s);
  // 2. hx_proj: hu (N, 2+D; row stride ldh) = mx W^T (+ b on the fp32 path; the bf16 path adds it where read).
  const int ldh = m.ldh();
  __nv_bfloat16* mx16 = bf ? m.held(m.mx16, N * D) : nullptr;
  const float* logits = m.hu.data();  // the router's two logits, row stride ld_logits
  int ld_logits = ldh;
  if (bf) {
    silu_logits_kernel<<<warp_grid(N), 32 * kWarpRows, 0, s>>>(N, D, m.ema_out.data(), m.p("hx_proj.weight"),
                                                               m.p("hx_proj.bias"), mx16, m.logits.data(), dr);
    SMA_CUDA_CHECK_LAUNCH();
    // hx alone (N x D, row stride D): the logits are above, so every operand is 16-byte aligned (with the 2 + D
    // columns cuBLAS falls back to slow 4-byte-aligned kernels).
    gemm_proj(m.blas, bf, ws, s, false, true, static_cast<int>(N), D, D, nullptr, D, m.p("hx_proj.weight") + 2 * D, D,
              0.f, m.hu.data(), D, mx16);
    logits = m.logits.data();
    ld_logits = 2;
  } else {
    if (m.dropout_on) {
      silu_dropout_kernel<<<grid(N * D), 256, 0, s>>>(N * D, m.ema_out.data(), m.mx.data(), dr);
      SMA_CUDA_CHECK_LAUNCH();
    } else {
      silu_forward(N * D, m.ema_out.data(), m.mx.data(), s);
    }
    copy_cols_kernel<<<row_grid(N), kRowThreads, 0, s>>>(N, 2 + D, m.p("hx_proj.bias"), 0, 0, m.hu.data(), ldh, 0);
    SMA_CUDA_CHECK_LAUNCH();
    gemm_proj(m.blas, bf, ws, s, false, true, static_cast<int>(N), 2 + D, D, m.mx.data(), D, m.p("hx_proj.weight"),
              D, 1.f, m.hu.data(), ldh);
  }
  // 3. router and the compression plan.
  router_forward(batch, length, logits, ld_logits, c.router_shift, m.p("q_router.temp"), pad, m.probs.data(),
                 m.active.data(), m.gate.data(), s);
  const CompressionView pv = m.plan->view();
  plan_compression(m.active.data(), c.routing, pv, s);
  // 4. GAU on the compressed rows. Without the host's S the products run on all B*L rows. fp32: rows past S are
  // zero (so everything stays finite there). bf16: the element-wise passes stop at S (read on the device), and
  // every bf16 operand is written with zero rows past S, so the products over the bound see exact zeros.
  long long M = N;
  const bool host_s = c.host_compressed_length;
  const int* S_dev = pv.offsets + batch;
  if (host_s) {
    int S = 0;
    SMA_CUDA_CHECK(cudaMemcpyAsync(&S, S_dev, sizeof(int), cudaMemcpyDeviceToHost, s));
    SMA_CUDA_CHECK(cudaStreamSynchronize(s));
    M = S;
  } else if (!bf) {
    SMA_CUDA_CHECK(cudaMemsetAsync(m.xc.data(), 0, N * D * sizeof(float), s));
    SMA_CUDA_CHECK(cudaMemsetAsync(m.att.data(), 0, N * H * sizeof(float), s));
  }
  m.rows_c = M;
  m.padded_attention = bf && c.attention.bf16 && c.padded_attention_operands;
  if (!m.padded_attention) m.ensure_qkv();
  const int Mi = static_cast<int>(M);
  const __nv_bfloat16* xc16 = nullptr;
  if (bf) {
    __nv_bfloat16* xc16w = m.held(m.xc16, N * D);
    if (M > 0) {
      compress_bf16_kernel<<<warp_grid(M), 32 * kWarpRows, 0, s>>>(M, D, mx16, pv.token, S_dev, xc16w);
      SMA_CUDA_CHECK_LAUNCH();
    }
    xc16 = xc16w;
  } else {
    compress(m.mx.data(), D, pv, m.xc.data(), s);
  }
  __nv_bfloat16* base16 = bf ? m.held(m.base16, N * P) : nullptr;
  if (bf) {
    const __nv_bfloat16* w16 = to_bf16(ws, s, m.p("mx_proj.weight"), 1LL * P * D, m.held(m.w_mx16, 1LL * P * D));
    if (host_s)
      gemm_bf16_out(m.blas, false, true, Mi, P, D, xc16, D, w16, D, base16, P);
    else
      bounded_gemm(Impl::rows_product(true, Mi, P, D, xc16, D, w16, D, base16, P, GemmType::bf16), S_dev, s);
    if (m.padded_attention) {
      const PaddedLayout lay = local_attention_padded_layout(c.attention, static_cast<int>(N));
      m.ensure_padded(lay, s);
      const auto qp = static_cast<__nv_bfloat16*>(m.qp16.data()), kp = static_cast<__nv_bfloat16*>(m.kp16.data()),
                 vp = static_cast<__nv_bfloat16*>(m.vp16.data());
      if (c.attention.position == Position::rotary)  // each block computes the Z/2 frequencies first: fewer blocks
        gau_act_padded_kernel<true><<<padded_blocks(M), kPaddedThreads, Z / 2 * sizeof(double), s>>>(
            M, Z, H, base16, m.p("mx_proj.bias"), m.p("gamma"), m.p("beta"), pv.positions, c.attention.rotary_theta,
            lay.offset, qp, kp, vp, S_dev, m.hidden_args());
      else
        gau_act_padded_kernel<false><<<padded_blocks(M), kPaddedThreads, 0, s>>>(
            M, Z, H, base16, m.p("mx_proj.bias"), m.p("gamma"), m.p("beta"), nullptr, 0.0, lay.offset, qp, kp, vp,
            S_dev, m.hidden_args());
    } else if (pairs)
      gau_act_bf16x2_kernel<<<row_grid(M), kRowThreads, 0, s>>>(
          M, Z, H, reinterpret_cast<const __nv_bfloat162*>(base16), m.p("mx_proj.bias"), m.p("gamma"), m.p("beta"),
          reinterpret_cast<float2*>(m.q.data()), reinterpret_cast<float2*>(m.k.data()),
          reinterpret_cast<float2*>(m.v.data()), S_dev, m.hidden_args());
    else
      gau_act_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, base16, m.p("mx_proj.bias"), m.p("gamma"),
                                                       m.p("beta"), m.q.data(), m.k.data(), nullptr, m.v.data(),
                                                       S_dev, m.hidden_args());
  } else {
    gemm_proj(m.blas, bf, ws, s, false, true, Mi, P, D, m.xc.data(), D, m.p("mx_proj.weight"), D, 0.f, m.base.data(),
              P);
    gau_act_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, m.base.data(), m.p("mx_proj.bias"), m.p("gamma"),
                                                       m.p("beta"), m.q.data(), m.k.data(), m.r.data(), m.v.data(),
                                                       nullptr, m.hidden_args());
  }
  SMA_CUDA_CHECK_LAUNCH();
  local_attention_forward(m.attention_config(), m.attention_inputs(), m.p("rel_pos_bias.rel_pos_bias"), m.att.data(),
                          m.row_stat.data(), s);
  // hc = hr h_proj^T, without its bias (output_kernel and the backward add it).
  const __nv_bfloat16* hr16 = nullptr;
  if (bf) {
    __nv_bfloat16* hr16w = m.held(m.hr16, N * H);
    if (M > 0) {
      if (pairs)
        mul_r_bf16x2_kernel<<<padded_blocks(M), kPaddedThreads, 0, s>>>(
            M, Z, H, reinterpret_cast<const float2*>(m.att.data()), reinterpret_cast<const __nv_bfloat162*>(base16),
            m.p("mx_proj.bias"), S_dev, reinterpret_cast<__nv_bfloat162*>(hr16w));
      else
        mul_r_bf16_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, m.att.data(), base16, m.p("mx_proj.bias"),
                                                            S_dev, hr16w);
      SMA_CUDA_CHECK_LAUNCH();
    }
    hr16 = hr16w;
  } else {
    mul_kernel<<<grid(M * H), 256, 0, s>>>(M * H, m.att.data(), m.r.data(), m.hr.data());
    SMA_CUDA_CHECK_LAUNCH();
  }
  if (bf) {
    const __nv_bfloat16* w16 = to_bf16(ws, s, m.p("h_proj.weight"), 1LL * D * H, m.held(m.w_h16, 1LL * D * H));
    if (host_s)
      gemm_proj(m.blas, bf, ws, s, false, true, Mi, D, H, nullptr, H, nullptr, H, 0.f, m.hc.data(), D, hr16, w16);
    else
      bounded_gemm(Impl::rows_product(true, Mi, D, H, hr16, H, w16, H, m.hc.data(), D, GemmType::fp32), S_dev, s);
  } else {
    gemm_proj(m.blas, bf, ws, s, false, true, Mi, D, H, m.hr.data(), H, m.p("h_proj.weight"), H, 0.f, m.hc.data(),
              D);
  }
  // 5. pre = hx + gate * h (activated tokens) + residual; out = silu(pre) (then the post-norm).
  float* act = c.prenorm ? out : m.act.data();
  {
    const int ldx = bf ? D : ldh;
    const float* hx = m.hu.data() + (bf ? 0 : 2);
    const float* hxb = bf ? m.p("hx_proj.bias") + 2 : nullptr;
    const int w = token_width(D, {ldx}, {m.x.data(), hx, hxb, m.hc.data(), m.p("h_proj.bias"), m.pre.data(), act});
    with_width(w, [&](auto v) {
      output_kernel<decltype(v)::value><<<warp_grid(N), 32 * kWarpRows, 0, s>>>(
          N, D, ldx, m.x.data(), hx, hxb, m.hc.data(), m.p("h_proj.bias"), m.gate.data(), pv.slot, pv.key_valid,
          m.pre.data(), act, dr, !c.bidirectional);
    });
    SMA_CUDA_CHECK_LAUNCH();
  }
  if (!c.prenorm)
    m.norm_fwd(N, m.act.data(), out, m.mean2.data(), m.rstd2.data(), m.bn_mean2.data(), m.bn_invstd2.data(), s);
  m.has_forward = true;
}

void SeqBoatLayerDevice::backward(const float* dy, float* dx, void* stream) {
  Impl& m = *impl_;
  if (!m.has_forward) throw ValueError("SeqBoatLayerDevice::backward: no forward to differentiate");
  const long long N = static_cast<long long>(m.B) * m.L;
  if (N == 0) return;
  if (!dy || !dx) throw ValueError("SeqBoatLayerDevice::backward: dy or dx is null");
  const SeqBoatDeviceConfig& c = m.cfg;
  const int D = c.embed_dim, Z = c.zdim, H = c.hdim, P = Z + 2 * H;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  detail::StreamWorkspace ws(s);
  const bool bf = c.bf16_projections;
  const bool pairs = bf && Z % 2 == 0 && H % 2 == 0;  // the bf16 passes over the base on column pairs
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  const CompressionView pv = m.plan->view();
  const DropoutArgs dr = m.dropout_args();
  // hx's gradient differs from dpre under the causal dropout; the bf16 path sums it for hx_proj's bias.
  float* dsum = bf && m.dropout_on && !c.bidirectional ? ws.alloc<float>(N * D) : nullptr;

  // 1. post-norm, final SiLU and the extraction: dpre, dgate, dhc (by slot) and dhu[:, 2:] = dpre in one pass.
  const long long M = m.rows_c;
  const int Mi = static_cast<int>(M);
  const bool host_s = c.host_compressed_length;
  const int* S_dev = pv.offsets + m.B;
  const int* bound = bf && !host_s ? S_dev : nullptr;  // the element-wise passes over compressed rows stop at S
  float* dpre = ws.alloc<float>(N * D);
  const float* dact = dy;
  if (!c.prenorm) {
    float* t = ws.alloc<float>(N * D);
    m.norm_bwd(N, m.act.data(), m.mean2.data(), m.rstd2.data(), m.bn_mean2.data(), m.bn_invstd2.data(), dy, t, s);
    dact = t;
  }
  float* dgate = ws.alloc<float>(N);
  float* dhc = bf ? nullptr : ws.alloc<float>(N * D);
  __nv_bfloat16* dhc16 = bf ? m.held(m.dhc16, N * D) : nullptr;
  const int ldh = m.ldh();
  float* dhu = bf ? nullptr : ws.alloc<float>(N * ldh);              // fp32: [dlogits | dhx], row stride ldh
  __nv_bfloat16* dhu16 = bf ? ws.alloc<__nv_bfloat16>(N * D) : nullptr;  // bf16: dhx alone (N x D)
  if (!bf && !host_s) SMA_CUDA_CHECK(cudaMemsetAsync(dhc, 0, N * D * sizeof(float), s));
  {
    const int ldx = bf ? D : ldh;
    float* dhx = bf ? nullptr : dhu + 2;
    const int w = token_width(D, {ldx}, {m.pre.data(), dact, m.hc.data(), m.p("h_proj.bias"), dpre, dhc, dhx, dsum},
                              {dhc16, dhu16});
    with_width(w, [&](auto v) {
      output_backward_kernel<decltype(v)::value><<<warp_grid(N), 32 * kWarpRows, 0, s>>>(
          N, D, ldx, m.pre.data(), dact, m.hc.data(), m.p("h_proj.bias"), m.gate.data(), pv.slot, pv.key_valid,
          dpre, dgate, dhc, dhc16, dhx, dhu16, dr, !c.bidirectional, dsum);
    });
    SMA_CUDA_CHECK_LAUNCH();
  }
  if (bf) {
    zero_tail_bf16_kernel<<<grid(M * D / 8), 256, 0, s>>>(M, D, S_dev, dhc16);
    SMA_CUDA_CHECK_LAUNCH();
  }
  // 2. The GAU, on rows_c rows (see forward). h_proj: dW += dhc^T hr, db += colsum(dhc), dhr = dhc W.
  // bf16: the forward's operand copies are reused; the gradients were written as bf16 in the passes above.
  const auto b16 = [&](DeviceBuffer& b) { return bf ? static_cast<const __nv_bfloat16*>(b.data()) : nullptr; };
  gemm_proj(m.blas, bf, ws, s, true, false, D, H, Mi, dhc, D, m.hr.data(), H, 1.f, m.g("h_proj.weight"), H, dhc16,
            b16(m.hr16));
  if (bf)
    column_sum_add_bf16(M, D, dhc16, D, m.g("h_proj.bias"), s, bound);
  else
    column_sum_add(M, D, dhc, D, nullptr, m.g("h_proj.bias"), s);
  // dhr = dhc W: bf16 on the bf16 path (as autocast's gradient of a bf16 product), fp32 otherwise.
  float* dhr = bf ? nullptr : ws.alloc<float>(N * H);
  __nv_bfloat16* dhr16 = bf ? m.held(m.dhr16, N * H) : nullptr;
  // The weight products (reductions over the rows) stay plain cuBLAS calls: bounded in chunks they run one after
  // another and only pay off at low density (docs/benchmarks.md, "Products bounded by S").
  if (bf && host_s)
    gemm_bf16_out(m.blas, false, false, Mi, H, D, dhc16, D, b16(m.w_h16), H, dhr16, H);
  else if (bf)
    bounded_gemm(Impl::rows_product(false, Mi, H, D, dhc16, D, b16(m.w_h16), H, dhr16, H, GemmType::bf16), S_dev, s);
  else
    gemm_proj(m.blas, bf, ws, s, false, false, Mi, H, D, dhc, D, m.p("h_proj.weight"), H, 0.f, dhr, H);
  const bool softmax = c.attention.activation == Activation::softmax;
  // With the padded operands, dout goes to the attention in bf16 only, unless softmax's row deltas need fp32.
  float* datt = m.padded_attention && !softmax ? nullptr : ws.alloc<float>(N * H);
  const __nv_bfloat16* base16 = bf ? static_cast<const __nv_bfloat16*>(m.base16.data()) : nullptr;
  if (m.padded_attention)
    mul_r_padded_kernel<<<padded_blocks(M), kPaddedThreads, 0, s>>>(
        M, Z, H, dhr16, base16, m.p("mx_proj.bias"), bound, datt, m.pad_layout.offset,
        static_cast<__nv_bfloat16*>(m.dop16.data()));
  else if (pairs)
    mul_r_x2_kernel<<<row_grid(M), kRowThreads, 0, s>>>(
        M, Z, H, reinterpret_cast<const __nv_bfloat162*>(dhr16), reinterpret_cast<const __nv_bfloat162*>(base16),
        m.p("mx_proj.bias"), bound, reinterpret_cast<float2*>(datt));
  else if (bf)
    mul_r_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, dhr16, base16, m.p("mx_proj.bias"), bound, datt);
  else
    mul_kernel<<<grid(M * H), 256, 0, s>>>(M * H, dhr, m.r.data(), datt);
  SMA_CUDA_CHECK_LAUNCH();
  float* dq = ws.alloc<float>(N * Z);
  float* dk = ws.alloc<float>(N * Z);
  float* dv = ws.alloc<float>(N * H);
  if (!host_s && !bf) {
    SMA_CUDA_CHECK(cudaMemsetAsync(dq, 0, N * Z * sizeof(float), s));
    SMA_CUDA_CHECK(cudaMemsetAsync(dk, 0, N * Z * sizeof(float), s));
    SMA_CUDA_CHECK(cudaMemsetAsync(dv, 0, N * H * sizeof(float), s));
  }
  LocalAttentionInputs att_in = m.attention_inputs();
  if (m.padded_attention) att_in.dout_padded = m.dop16.data();
  local_attention_backward(m.attention_config(), att_in, m.p("rel_pos_bias.rel_pos_bias"),
                           softmax ? m.att.data() : nullptr, softmax ? m.row_stat.data() : nullptr, datt, dq, dk, dv,
                           m.g("rel_pos_bias.rel_pos_bias"), s);
  float* dbase = bf ? nullptr : ws.alloc<float>(N * P);
  __nv_bfloat16* dbase16 = bf ? m.held(m.dbase16, N * P) : nullptr;
  // The gamma and beta gradients: column sums of (dq z, dk z, dq, dk); the column-pair pass takes them itself.
  float* dgamma = m.g("gamma");
  float* dbeta = m.g("beta");
  float* gb_out[4] = {dgamma, dgamma + Z, dbeta, dbeta + Z};
  if (pairs && Z <= 128) {  // the pass's lanes hold at most 64 z column pairs (the layer takes Z <= 128 anyway)
    const unsigned blocks = padded_blocks(M);
    double* gb_part = ws.alloc<double>(4LL * blocks * Z);
    gau_dbase_bf16x2_kernel<<<blocks, kPaddedThreads, 0, s>>>(
        M, Z, H, reinterpret_cast<const __nv_bfloat162*>(base16), m.p("mx_proj.bias"), m.p("gamma"),
        reinterpret_cast<const float2*>(dq), reinterpret_cast<const float2*>(dk),
        reinterpret_cast<const __nv_bfloat162*>(dhr16), reinterpret_cast<const float2*>(m.att.data()),
        reinterpret_cast<const float2*>(dv), reinterpret_cast<__nv_bfloat162*>(dbase16), gb_part, bound,
        m.hidden_args());
    SMA_CUDA_CHECK_LAUNCH();
    column_partials_finish(static_cast<int>(blocks), Z, 4, gb_part, gb_out, s);
  } else {
    float* tq = ws.alloc<float>(N * Z);
    float* tk = ws.alloc<float>(N * Z);
    if (bf)
      gau_dbase_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, base16, m.p("mx_proj.bias"), m.p("gamma"), dq,
                                                           dk, dhr16, m.att.data(), dv, dbase, dbase16, tq, tk, bound,
                                                           m.hidden_args());
    else
      gau_dbase_kernel<<<row_grid(M), kRowThreads, 0, s>>>(M, Z, H, m.base.data(), m.p("mx_proj.bias"),
                                                           m.p("gamma"), dq, dk, dhr, m.att.data(), dv, dbase,
                                                           dbase16, tq, tk, bound, m.hidden_args());
    SMA_CUDA_CHECK_LAUNCH();
    const float* a[4] = {tq, tk, dq, dk};
    column_sums_add(M, Z, 4, a, gb_out, s, bound);
  }
  // mx_proj: dW += dbase^T xc, db += colsum(dbase), dxc = dbase W (added to the tokens' dmx below).
  gemm_proj(m.blas, bf, ws, s, true, false, P, D, Mi, dbase, P, m.xc.data(), D, 1.f, m.g("mx_proj.weight"), D, dbase16,
            b16(m.xc16));
  if (bf)
    column_sum_add_bf16(M, P, dbase16, P, m.g("mx_proj.bias"), s, bound);
  else
    column_sum_add(M, P, dbase, P, nullptr, m.g("mx_proj.bias"), s);
  float* dxc = bf ? Impl::held<float>(m.dxc, N * D) : ws.alloc<float>(N * D);
  if (bf && !host_s)
    bounded_gemm(Impl::rows_product(false, Mi, D, P, dbase16, P, b16(m.w_mx16), D, dxc, D, GemmType::fp32), S_dev, s);
  else
    gemm_proj(m.blas, bf, ws, s, false, false, Mi, D, P, dbase, P, m.p("mx_proj.weight"), D, 0.f, dxc, D, dbase16,
              b16(m.w_mx16));
  // 3. router and hx_proj: dhu = [dlogits | dpre].
  float* dlogits = bf ? ws.alloc<float>(N * 2) : dhu;
  router_backward(N, bf ? m.logits.data() : m.hu.data(), bf ? 2 : ldh, c.router_shift, m.p("q_router.temp"),
                  m.probs.data(), m.active.data(), dgate,
                  dlogits, bf ? 2 : ldh, m.g("q_router.temp"), s);
  float* dmx = ws.alloc<float>(N * D);
  if (bf) {
    // hx's rows of hx_proj (aligned products), then the logits' two rows: dW[0:2] += dlogits^T mx (a small
    // product) and their share of dmx in dmx_kernel.
    column_sum_add(N, 2, dlogits, 2, nullptr, m.g("hx_proj.bias"), s);
    column_sum_add(N, D, dsum ? dsum : dpre, D, nullptr, m.g("hx_proj.bias") + 2, s);
    gemm_proj(m.blas, bf, ws, s, true, false, D, D, static_cast<int>(N), nullptr, D, nullptr, D, 1.f,
              m.g("hx_proj.weight") + 2 * D, D, dhu16, b16(m.mx16));
    gemm_proj(m.blas, bf, ws, s, false, false, static_cast<int>(N), D, D, nullptr, D, m.p("hx_proj.weight") + 2 * D, D,
              0.f, dmx, D, dhu16);
    __nv_bfloat16* dl16 = ws.alloc<__nv_bfloat16>(N * 2);
    logits_to_bf16_kernel<<<grid(2 * N), 256, 0, s>>>(N, 2, dlogits, dl16);
    SMA_CUDA_CHECK_LAUNCH();
    gemm_proj(m.blas, bf, ws, s, true, false, 2, D, static_cast<int>(N), nullptr, 2, nullptr, D, 1.f,
              m.g("hx_proj.weight"), D, dl16, b16(m.mx16));
  } else {
    column_sum_add(N, 2 + D, dhu, ldh, nullptr, m.g("hx_proj.bias"), s);
    gemm_proj(m.blas, bf, ws, s, true, false, 2 + D, D, static_cast<int>(N), dhu, ldh, m.mx.data(), D, 1.f,
              m.g("hx_proj.weight"), D);
    gemm_proj(m.blas, bf, ws, s, false, false, static_cast<int>(N), D, 2 + D, dhu, ldh, m.p("hx_proj.weight"), D, 0.f,
              dmx, D);
  }
  // 4. compression backward + SiLU, EMA, pre-norm, residual.
  with_width(token_width(D, {}, {m.ema_out.data(), dxc, m.p("hx_proj.weight"), dmx}), [&](auto v) {
    dmx_kernel<decltype(v)::value><<<warp_grid(N), 32 * kWarpRows, 0, s>>>(
        N, D, m.ema_out.data(), dxc, pv.slot, bf ? dlogits : nullptr, m.p("hx_proj.weight"), dmx, dr);
  });
  SMA_CUDA_CHECK_LAUNCH();
  const float* xin = c.prenorm ? m.xin.data() : m.x.data();
  float* dxin = c.prenorm ? ws.alloc<float>(N * D) : dx;
  // Without a pre-norm, the residual's gradient is added by the EMA's backward pass (it writes dx), with one by the
  // norm's.
  ema_backward(m.ema_cfg(), m.ema_params(), xin, pad, dmx, dxin,
               {m.g("ssm.delta"), m.g("ssm.alpha"), m.g("ssm.beta"), m.g("ssm.gamma"), m.g("ssm.omega")}, s,
               c.prenorm ? nullptr : dpre);
  if (c.prenorm)
    m.norm_bwd(N, m.x.data(), m.mean.data(), m.rstd.data(), m.bn_mean.data(), m.bn_invstd.data(), dxin, dx, s, dpre);
}

void SeqBoatLayerDevice::zero_grad(void* stream) {
  for (auto& [name, g] : impl_->grad) g.fill_bytes(0, stream);
}

std::vector<std::string> SeqBoatLayerDevice::param_names() const { return impl_->names; }

std::vector<DeviceParamRef> SeqBoatLayerDevice::param_refs() {
  std::vector<DeviceParamRef> out;
  for (const std::string& n : impl_->names) {
    DeviceArray<float>& v = impl_->value.at(n);
    out.push_back({n, v.data(), impl_->grad.at(n).data(), static_cast<long long>(v.size())});
  }
  return out;
}

std::vector<float> SeqBoatLayerDevice::param(const std::string& name, void* stream) const {
  auto it = impl_->value.find(name);
  if (it == impl_->value.end()) throw KeyError(str_cat("SeqBoatLayerDevice: no parameter ", name));
  return it->second.download(stream);
}

std::vector<float> SeqBoatLayerDevice::grad(const std::string& name, void* stream) const {
  auto it = impl_->grad.find(name);
  if (it == impl_->grad.end()) throw KeyError(str_cat("SeqBoatLayerDevice: no parameter ", name));
  return it->second.download(stream);
}

std::vector<std::uint8_t> SeqBoatLayerDevice::active(void* stream) const { return impl_->active.download(stream); }

const DeviceCompression& SeqBoatLayerDevice::plan() const {
  if (!impl_->plan) throw ValueError("SeqBoatLayerDevice::plan: no forward yet");
  return *impl_->plan;
}

}  // namespace sma::cuda
