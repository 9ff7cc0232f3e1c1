// cuda/local_attention/band_bf16.cuh: the bf16 tensor-core path (LocalAttentionConfig::bf16), forward pieces shared
// with the backward: band geometry, the padded bf16 copies (rotary folded in), the cuBLAS products and the forward
// band kernel. The backward's own kernels are in band_bf16_bwd.cuh.
//
// WHY a band of cuBLAS products and not a fused kernel: the queries of block b (kBandRows = 64 slots) can only see
// the keys of slots [64b - W', 64b + 64 + W') (W' = the window rounded up to 64; only the left side when causal), a
// fixed-width window that starts 64 rows later for the next block. A strided-batched GEMM with a batch stride of
// 64 rows therefore computes every block's scores against its own window in one call (the windows overlap in
// memory, which a strided batch allows for its inputs), with cuBLAS's tensor-core kernels, and materialises only a
// capacity x (64 + W' [+ W']) band, never S x S. Everything that is not a product (masks, bias, activations, the
// softmax statistics, dS) is an elementwise pass over that band in fp32.
// Layout: band row i (slot i, i < nb*64) holds the scores of query i against the keys of slots 64*(i/64) - W' + c,
// c < width. The key-major band (backward) holds, for key slot j, the queries 64*(j/64) - Wlo + c (Wlo = W' when
// bidirectional, else 0). Since W' is a multiple of 64, the two bands are 64 x 64 tiles of each other, transposed.
// Padded copies: row W' + s holds slot s (s < S, bf16, rotated for rotary), every other row is zero, so the
// windows of the first and last blocks and the slots >= S read zeros (never NaN from uninitialised memory).
#pragma once

#include "launch.cuh"
#include "tile.cuh"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <vector>

namespace sma::cuda::attn {

constexpr int kBandRows = 64;  // slots per block (the batch stride of the products, and the tile of the transposes)

struct BandGeometry {
  int nb = 0;         // blocks of kBandRows slots covering `capacity`
  int wpad = 0;       // W' = min(W, capacity) rounded up to kBandRows
  int wlo = 0;        // keys (resp. queries) left of the block in the query-major (resp. key-major) band: W' or 0
  int width = 0;      // band width: kBandRows + W' (+ W' bidirectional)
  long long rows = 0; // rows of the padded copies: nb * kBandRows + 2 W'

  BandGeometry(const LocalAttentionConfig& cfg, int capacity) {
    nb = (capacity + kBandRows - 1) / kBandRows;
    // No two slots of one row are further apart than capacity - 1, so a longer window changes nothing.
    const int w = std::min(cfg.window, capacity);
    wpad = (w + kBandRows - 1) / kBandRows * kBandRows;
    wlo = cfg.causal ? 0 : wpad;
    width = kBandRows + wpad + (cfg.causal ? 0 : wpad);
    rows = static_cast<long long>(nb) * kBandRows + 2LL * wpad;
  }
  long long band() const { return static_cast<long long>(nb) * kBandRows * width; }
};

namespace {

/// dst (rows, width) bf16: row wpad + s = bf16(R(positions[s]) src row s) for s < S (rotation only when `rotary`),
/// every other row zero. Angles and rotation in double, as rotary_kernel. One thread per pair of columns.
__global__ void pad_bf16_kernel(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int width,
                                long long rows, int wpad, const int* __restrict__ offsets, int batch,
                                const int* __restrict__ positions, int rotary, double theta) {
  const int S = offsets[batch];
  const int half = (width + 1) / 2;
  const long long n = rows * half;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = idx / half;
    const int c = 2 * static_cast<int>(idx - r * half);
    const long long s = r - wpad;
    float x0 = 0.f, x1 = 0.f;
    if (s >= 0 && s < S) {
      const float* row = src + s * width;
      x0 = row[c];
      x1 = c + 1 < width ? row[c + 1] : 0.f;
      if (rotary) {
        const double inv = 1.0 / pow(theta, static_cast<double>(c) / static_cast<double>(width));
        double sn, cs;
        sincos(static_cast<double>(positions[s]) * inv, &sn, &cs);
        const double y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
        x0 = static_cast<float>(y0);
        x1 = static_cast<float>(y1);
      }
    }
    __nv_bfloat16* d = dst + r * width + c;
    if (c + 1 < width && (width % 2 == 0)) {
      *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(x0, x1);
    } else {
      d[0] = __float2bfloat16_rn(x0);
      if (c + 1 < width) d[1] = __float2bfloat16_rn(x1);
    }
  }
}

/// Everything the band kernels need besides LocalAttentionParams.
struct BandParams {
  int nb, wpad, wlo, width;
};

/// The visible key slots of query i (row [rb, re)) form the contiguous range [lo, hi) (key_valid aside).
__device__ __forceinline__ void visible_range(const LocalAttentionParams& p, int i, int rb, int re, int& lo, int& hi) {
  lo = max(rb, i - p.window);
  hi = p.causal ? i + 1 : min(re, i + p.window + 1);
}

/// Forward elementwise pass, one warp per band row i: x = score + bias where visible; weights to `pq` (bf16, zero
/// where invisible and for rows >= S), the softmax log-sum-exp to row_stat (rows < S; +inf without a visible key).
__global__ void band_forward_kernel(const LocalAttentionParams p, const BandParams g, const float* __restrict__ sband,
                                    __nv_bfloat16* __restrict__ pq) {
  const int S = p.offsets[p.batch];
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  const int n = g.nb * kBandRows;
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < n; i += warps) {
    __nv_bfloat16* prow = pq + static_cast<long long>(i) * g.width;
    if (i >= S) {
      for (int c = lane; c < g.width; c += 32) prow[c] = __float2bfloat16_rn(0.f);
      continue;
    }
    const float* srow = sband + static_cast<long long>(i) * g.width;
    const int b = find_row(p.offsets, p.batch, i);
    const int rb = p.offsets[b], re = p.offsets[b + 1];
    const int pos_i = p.positions ? p.positions[i] : 0;
    const int base = i / kBandRows * kBandRows - g.wpad;  // key slot of band column 0
    int lo, hi;
    visible_range(p, i, rb, re, lo, hi);
    const auto score = [&](int c, bool& vis) {
      const int j = base + c;
      vis = j >= lo && j < hi && (!p.key_valid || p.key_valid[j]);
      return vis ? srow[c] + bias_value(p, i, j, pos_i, p.positions ? p.positions[j] : 0) : 0.f;
    };
    if (p.activation == kSoftmax) {
      float m = -INFINITY;
      for (int c = lane; c < g.width; c += 32) {
        bool vis;
        const float x = score(c, vis);
        if (vis) m = fmaxf(m, x);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float l = 0.f;
      for (int c = lane; c < g.width; c += 32) {
        bool vis;
        const float x = score(c, vis);
        if (vis) l += expf(x - m);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (int c = lane; c < g.width; c += 32) {
        bool vis;
        const float x = score(c, vis);
        prow[c] = __float2bfloat16_rn(vis ? expf(x - m) * inv : 0.f);
      }
      if (lane == 0 && p.row_stat) p.row_stat[i] = l > 0.f ? m + logf(l) : INFINITY;
    } else {
      for (int c = lane; c < g.width; c += 32) {
        bool vis;
        const float x = score(c, vis);
        prow[c] = __float2bfloat16_rn(vis ? activate(p.activation, x) : 0.f);
      }
    }
  }
}

}  // namespace

/// The cuBLAS handle of the current device for this host thread, created on first use and kept (a handle costs
/// milliseconds to create; the attention is called every step).
inline cublasHandle_t band_blas_handle() {
  thread_local std::vector<cublasHandle_t> handles;
  int dev = 0;
  SMA_CUDA_CHECK(cudaGetDevice(&dev));
  if (static_cast<int>(handles.size()) <= dev) handles.resize(static_cast<std::size_t>(dev) + 1, nullptr);
  if (!handles[dev]) SMA_CUDA_CHECK(cublasCreate(&handles[dev]));
  return handles[dev];
}

/// Row-major, batched: C[t] (M x N, ldc) = alpha A[t] (M x K, lda) op(B[t]) for t < batch; op(B) = B^T with B
/// (N x K, ldb) when b_nk, else B (K x N, ldb). bf16 operands, fp32 accumulation and result.
inline void band_gemm(cublasHandle_t h, bool b_nk, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
                      long long sa, const __nv_bfloat16* B, int ldb, long long sb, float* C, int ldc, long long sc,
                      int batch) {
  if (batch <= 0 || M <= 0) return;
  const float beta = 0.f;
  // Column-major view: C^T = op(B)^T A^T.
  SMA_CUDA_CHECK(cublasGemmStridedBatchedEx(h, b_nk ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &alpha, B,
                                            CUDA_R_16BF, ldb, sb, A, CUDA_R_16BF, lda, sa, &beta, C, CUDA_R_32F, ldc,
                                            sc, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/// A product whose result rows are slots (out, dq, dk, dv: `capacity` rows): full blocks batched, the last partial
/// block as one more product, so nothing past row capacity is written.
inline void band_gemm_rows(cublasHandle_t h, int capacity, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
                           long long sa, const __nv_bfloat16* B, int ldb, long long sb, float* C, int ldc) {
  const int full = capacity / kBandRows, tail = capacity - full * kBandRows;
  const long long sc = static_cast<long long>(kBandRows) * ldc;
  band_gemm(h, false, kBandRows, N, K, alpha, A, lda, sa, B, ldb, sb, C, ldc, sc, full);
  band_gemm(h, false, tail, N, K, alpha, A + full * sa, lda, sa, B + full * sb, ldb, sb, C + full * sc, ldc, sc, 1);
}

inline int band_grid(long long n, int per_block) {
  return static_cast<int>(std::min<long long>(std::max<long long>((n + per_block - 1) / per_block, 1), 132LL * 32));
}

/// The padded bf16 copy of src (capacity, width): see pad_bf16_kernel.
inline void launch_pad_bf16(const float* src, __nv_bfloat16* dst, int width, const BandGeometry& g,
                            const LocalAttentionInputs& in, const LocalAttentionConfig& cfg, bool rotary,
                            cudaStream_t s) {
  const long long n = g.rows * ((width + 1) / 2);
  pad_bf16_kernel<<<band_grid(n, 256), 256, 0, s>>>(src, dst, width, g.rows, g.wpad, in.offsets, in.batch,
                                                    in.positions, rotary ? 1 : 0, cfg.rotary_theta);
  SMA_CUDA_CHECK_LAUNCH();
}

inline BandParams band_params(const BandGeometry& g) { return BandParams{g.nb, g.wpad, g.wlo, g.width}; }

/// The bf16 forward (local_attention_forward when cfg.bf16): scores band, weights band, out.
inline void local_attention_forward_bf16(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                                         LocalAttentionParams p, float* out, cudaStream_t s) {
  const BandGeometry g(cfg, in.capacity);
  AsyncWorkspace ws(s);
  const bool rot = cfg.position == Position::rotary;
  __nv_bfloat16* qp = ws.alloc<__nv_bfloat16>(g.rows * in.z);
  __nv_bfloat16* kp = ws.alloc<__nv_bfloat16>(g.rows * in.z);
  __nv_bfloat16* vp = ws.alloc<__nv_bfloat16>(g.rows * in.h);
  launch_pad_bf16(in.q, qp, in.z, g, in, cfg, rot, s);
  launch_pad_bf16(in.k, kp, in.z, g, in, cfg, rot, s);
  launch_pad_bf16(in.v, vp, in.h, g, in, cfg, false, s);
  float* sband = ws.alloc<float>(g.band());
  __nv_bfloat16* pq = ws.alloc<__nv_bfloat16>(g.band());
  cublasHandle_t h = band_blas_handle();
  SMA_CUDA_CHECK(cublasSetStream(h, s));
  const long long blk = kBandRows;
  // scores: block t's queries (padded rows W' + 64t ...) against its key window (padded rows 64t ...).
  band_gemm(h, true, kBandRows, g.width, in.z, p.scale, qp + g.wpad * static_cast<long long>(in.z), in.z, blk * in.z,
            kp, in.z, blk * in.z, sband, g.width, blk * g.width, g.nb);
  band_forward_kernel<<<band_grid(g.nb * blk, 8), 256, 0, s>>>(p, band_params(g), sband, pq);
  SMA_CUDA_CHECK_LAUNCH();
  band_gemm_rows(h, in.capacity, in.h, g.width, 1.f, pq, g.width, blk * g.width, vp, in.h, blk * in.h, out, in.h);
}

}  // namespace sma::cuda::attn
