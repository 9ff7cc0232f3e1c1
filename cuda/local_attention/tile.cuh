// cuda/local_attention/tile.cuh: device building blocks shared by the forward and backward kernels: row lookup,
// visibility, position bias, activations, shared-memory staging and the 4 x 4 micro-tile product.
#pragma once

#include "kernel_traits.cuh"
#include "params.cuh"

#include <sma/cuda/dropout.hpp>

#include <cuda_runtime.h>

#include <cmath>

namespace sma::cuda::attn {

// MEGA's laplace attention constants (as sma::ops::detail::Laplace).
constexpr float kLaplaceMu = 0.70710678118654752440f;
constexpr float kLaplaceInvSigmaSqrt2 = static_cast<float>(1.0 / (0.28209479177387814347 * 1.41421356237309504880));
constexpr float kLaplacePdfScale = static_cast<float>(1.0 / (0.28209479177387814347 * 2.50662827463100050242));

/// The row b with offsets[b] <= i < offsets[b+1] (i < offsets[batch]; empty rows are skipped).
__device__ __forceinline__ int find_row(const int* __restrict__ offsets, int batch, int i) {
  int lo = 0, hi = batch;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid + 1] <= i) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/// Window and same-row test for query slot i (its row [rb, re)) and key slot j; key_valid is checked by the caller.
__device__ __forceinline__ bool in_window(const LocalAttentionParams& p, int i, int rb, int re, int j) {
  if (j < rb || j >= re || j < i - p.window) return false;
  return p.causal ? j <= i : j <= i + p.window;
}

/// Table index of the pair (query slot i at position pos_i, key slot j at pos_j), or -1 without a table.
__device__ __forceinline__ int bias_index(const LocalAttentionParams& p, int i, int j, int pos_i, int pos_j) {
  if (p.position == kPosSimple) {
    const int e = p.max_positions - 1 + (pos_j - pos_i);
    return min(max(e, 0), 2 * p.max_positions - 2);
  }
  if (p.position == kPosLocal) return 4 * p.window - 1 + (j - i);
  return -1;
}

__device__ __forceinline__ float bias_value(const LocalAttentionParams& p, int i, int j, int pos_i, int pos_j) {
  const int e = bias_index(p, i, j, pos_i, pos_j);
  return e >= 0 ? p.bias_table[e] : 0.f;
}

/// The attention-dropout mask of one CTA (LocalAttentionConfig::dropout): m(i, j) = 0 or 1 / (1 - p) for query slot
/// i and key slot j, the CPU op's ops::detail::DropoutMask bit for bit (the same splitmix64 finaliser, seed and
/// 53-bit threshold), so nothing is stored and the backward kernels recompute it.
struct WeightDropout {
  std::uint64_t seed = 0, threshold = 0;
  float keep = 1.f;
  bool on = false;
  __device__ explicit WeightDropout(const LocalAttentionParams& p) : threshold(p.drop_threshold), on(p.drop_threshold > 0) {
    if (on) {
      seed = dropout_mix(p.drop_draw ? dropout_key(p.drop_seed, *p.drop_draw, DropoutSite::attention) : p.drop_seed);
      keep = p.drop_keep;
    }
  }
  __device__ __forceinline__ float operator()(int i, int j) const {
    const std::uint64_t h = dropout_mix(
        seed ^ dropout_mix(static_cast<std::uint64_t>(i) * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(j)));
    return (h >> 11) >= threshold ? keep : 0.f;
  }
};

/// Attention weight of a visible score x (not softmax: that needs the row's log-sum-exp, see callers).
__device__ __forceinline__ float activate(int act, float x) {
  if (act == kRelu2) {
    const float r = fmaxf(x, 0.f);
    return r * r;
  }
  return 0.5f * (1.f + erff((x - kLaplaceMu) * kLaplaceInvSigmaSqrt2));
}

/// d weight / d score of a visible score x, for relu2 and laplace.
__device__ __forceinline__ float activate_grad(int act, float x) {
  if (act == kRelu2) return 2.f * fmaxf(x, 0.f);
  const float z = (x - kLaplaceMu) * kLaplaceInvSigmaSqrt2;
  return kLaplacePdfScale * expf(-z * z);
}

/// Four consecutive floats of a row of `width` (zeros past its end); float4 when the row allows it.
__device__ __forceinline__ float4 load4(const float* __restrict__ row, int col, int width, int vec) {
  if (vec && col + 3 < width) return __ldg(reinterpret_cast<const float4*>(row + col));
  float4 r;
  r.x = col < width ? __ldg(row + col) : 0.f;
  r.y = col + 1 < width ? __ldg(row + col + 1) : 0.f;
  r.z = col + 2 < width ? __ldg(row + col + 2) : 0.f;
  r.w = col + 3 < width ? __ldg(row + col + 3) : 0.f;
  return r;
}

/// Registers of one thread's share of a staged tile, loaded one step ahead (software pipelining): the global loads
/// of step t+1 are in flight while step t's product runs from shared memory.
/// Transposed staging: dst[kk * kLd + r] = scale * src[row0 + r, col0 + kk] for r < 64, kk < kStageK (a
/// reduction-major tile). Rows r >= nrows and columns past `width` are zero and never read from global memory.
template <class Tr>
struct TransposedStager {
  static constexpr int kCols4 = Tr::kStageK / 4;
  static constexpr int kPer = Tr::kBlockM * kCols4 / Tr::kThreads;
  static_assert(Tr::kBlockM * kCols4 % Tr::kThreads == 0, "each thread stages the same number of float4");
  float4 r[kPer];

  __device__ __forceinline__ void load(const float* __restrict__ src, int width, int row0, int nrows, int col0,
                                       int vec) {
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int idx = threadIdx.x + t * Tr::kThreads;
      const int rr = idx % Tr::kBlockM, c4 = idx / Tr::kBlockM;
      r[t] = rr < nrows ? load4(src + static_cast<long long>(row0 + rr) * width, col0 + 4 * c4, width, vec)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  __device__ __forceinline__ void store(float* __restrict__ dst, float scale) const {
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int idx = threadIdx.x + t * Tr::kThreads;
      const int rr = idx % Tr::kBlockM, c4 = idx / Tr::kBlockM;
      float* d = dst + 4 * c4 * Tr::kLd + rr;
      d[0] = r[t].x * scale;
      d[Tr::kLd] = r[t].y * scale;
      d[2 * Tr::kLd] = r[t].z * scale;
      d[3 * Tr::kLd] = r[t].w * scale;
    }
  }
};

/// Row staging of the streamed B operand: dst[rr * (N + 4) + n] = scale * src[row0 + rr, col0 + n] for
/// rr < kSubRows, n < N. Rows rr >= nrows and columns past `width` are zero.
template <class Tr, int N>
struct RowStager {
  static constexpr int kCols4 = N / 4, kLdN = N + 4;
  static constexpr int kPer = Tr::kSubRows * kCols4 / Tr::kThreads;
  static_assert(Tr::kSubRows * kCols4 % Tr::kThreads == 0, "each thread stages the same number of float4");
  float4 r[kPer];

  __device__ __forceinline__ void load(const float* __restrict__ src, int width, int row0, int nrows, int col0,
                                       int vec) {
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int idx = threadIdx.x + t * Tr::kThreads;
      const int rr = idx / kCols4, c4 = idx % kCols4;
      r[t] = rr < nrows ? load4(src + static_cast<long long>(row0 + rr) * width, col0 + 4 * c4, width, vec)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  __device__ __forceinline__ void store(float* __restrict__ dst, float scale) const {
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int idx = threadIdx.x + t * Tr::kThreads;
      const int rr = idx / kCols4, c4 = idx % kCols4;
      *reinterpret_cast<float4*>(dst + rr * kLdN + 4 * c4) =
          make_float4(r[t].x * scale, r[t].y * scale, r[t].z * scale, r[t].w * scale);
    }
  }
};

/// acc[i][4s + j] += sum_{kk < K} A[kk * lda + 4 tm + i] * B[kk * ldb + 64 s + 4 tn + j]: thread (tm, tn)'s 4 x 4
/// micro-tiles (s < NS) of a 64 x 64NS product whose operands are stored reduction-major in shared memory.
template <int NS, int K>
__device__ __forceinline__ void tile_mma(float (&acc)[4][4 * NS], const float* __restrict__ A, int lda,
                                         const float* __restrict__ B, int ldb, int tm, int tn) {
#pragma unroll 8
  for (int kk = 0; kk < K; ++kk) {
    const float4 a = *reinterpret_cast<const float4*>(A + kk * lda + 4 * tm);
    const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const float4 b = *reinterpret_cast<const float4*>(B + kk * ldb + 64 * s + 4 * tn);
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][4 * s + j] = fmaf(av[i], bv[j], acc[i][4 * s + j]);
    }
  }
}

/// Writes thread (tm, tn)'s 4 x 4 values v[i][j] (row 4tm+i, column 4tn+j) transposed: dst[(4tn+j) * kLd + 4tm+i].
/// The result is reduction-major over the columns, i.e. the A operand of the next product.
template <class Tr>
__device__ __forceinline__ void store_transposed(float* __restrict__ dst, const float (&v)[4][4], int tm, int tn) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    *reinterpret_cast<float4*>(dst + (4 * tn + j) * Tr::kLd + 4 * tm) = make_float4(v[0][j], v[1][j], v[2][j], v[3][j]);
}

/// Sum / max over the 16 threads of one micro-tile row (lanes 0-15 or 16-31 of a warp). The butterfly gives every
/// lane the identical result (each step adds the same two operands, only in swapped order).
__device__ __forceinline__ float row_sum16(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float row_max16(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

/// A 64 x 64 tile of row dot products (scores, or dA = dout . v): s[i][j] = sum_z a_scale * A[a0 + 4tm + i, z] *
/// b_scale * B[b0 + 4tn + j, z], the reduction over `width` staged kStageK columns at a time (loads one step ahead).
/// Begins with a barrier (the staging area may still be read by the caller's previous product).
template <class Tr>
__device__ __forceinline__ void tile_dot(float (&s)[4][4], float* stage, const float* __restrict__ a, int a0, int na,
                                         float a_scale, const float* __restrict__ b, int b0, int nb, float b_scale,
                                         int width, int vec, int tm, int tn) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
  TransposedStager<Tr> ga, gb;
  ga.load(a, width, a0, na, 0, vec);
  gb.load(b, width, b0, nb, 0, vec);
  for (int z0 = 0; z0 < width; z0 += Tr::kStageK) {
    __syncthreads();
    ga.store(stage, a_scale);
    gb.store(stage + Tr::kStageK * Tr::kLd, b_scale);
    __syncthreads();
    if (z0 + Tr::kStageK < width) {
      ga.load(a, width, a0, na, z0 + Tr::kStageK, vec);
      gb.load(b, width, b0, nb, z0 + Tr::kStageK, vec);
    }
    tile_mma<1, Tr::kStageK>(s, stage, Tr::kLd, stage + Tr::kStageK * Tr::kLd, Tr::kLd, tm, tn);
  }
}

/// acc += T^T-product over the `n` rows of a chunk: acc[i][4s + j] += sum_{c < n} tile[c * kLd + 4tm + i] *
/// scale * src[row0 + c, col0 + 64s + 4tn + j], src rows streamed kSubRows at a time (loads one step ahead).
/// Begins with a barrier, so `tile` may have been written just before the call.
template <class Tr, int N>
__device__ __forceinline__ void tile_stream(float (&acc)[4][N / 16], const float* tile, float* stage,
                                            const float* __restrict__ src, int width, int row0, int n, int col0,
                                            float scale, int vec, int tm, int tn) {
  RowStager<Tr, N> g;
  g.load(src, width, row0, min(Tr::kSubRows, n), col0, vec);
  for (int c0 = 0; c0 < n; c0 += Tr::kSubRows) {
    __syncthreads();
    g.store(stage, scale);
    __syncthreads();
    if (c0 + Tr::kSubRows < n) g.load(src, width, row0 + c0 + Tr::kSubRows, min(Tr::kSubRows, n - c0 - Tr::kSubRows),
                                      col0, vec);
    tile_mma<N / 64, Tr::kSubRows>(acc, tile + c0 * Tr::kLd, Tr::kLd, stage, N + 4, tm, tn);
  }
}

}  // namespace sma::cuda::attn
