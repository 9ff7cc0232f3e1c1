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
// windows of the first and last blocks and the slots >= S read zeros (never NaN from uninitialised memory). A caller
// may write them itself (LocalAttentionInputs::*_padded, sma/cuda/local_attention.hpp): then only the zero rows
// past S are written here (zero_padded_tails), one launch for all such operands of a call.
// Following S: every product is a cuda::bounded_gemm over the blocks (about 16 chunks of blocks, a chunk running
// only when it holds a slot < S, decided on the device), and the elementwise passes stop at the rows that the
// running chunks read (band_row_bound; the padded copies W' rows further on each side, the backward's weights W'
// further for the key-major tiles). Rows past those are neither read nor written.
#pragma once

#include "common/bf16_fill.cuh"
#include "common/bounded_gemm.cuh"
#include "launch.cuh"
#include "tile.cuh"

#include <cuda_bf16.h>

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

/// dst (rows, width) bf16: row wpad + s = bf16(R(positions[s]) src row s) for s < S (rotation only when kRot),
/// every other row zero, up to the last row that a running chunk of the band products reads (chunk: slots per
/// chunk, 0 = all rows; see band_row_bound); rows past it are not written. One warp per row, V consecutive columns per lane and step (V divides width; with kRot
/// V is even, so a lane holds whole rotary pairs); `vec`: src rows may be read as float2/float4. Frequencies as
/// rotary_kernel, angles reduced in double, then sincosf (rotate_pair_bf16_path, which callers that write these
/// rows themselves share: LocalAttentionInputs::q_padded).
template <int V, bool kRot>
__global__ void pad_bf16_kernel(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int width,
                                long long rows, int wpad, const int* __restrict__ offsets, int batch,
                                const int* __restrict__ positions, double theta, int vec, int chunk) {
  extern __shared__ double pad_inv[];
  if constexpr (kRot) rotary_frequencies(pad_inv, width, theta);
  const int S = offsets[batch];
  const long long end = min(rows, detail::bounded_rows(S, chunk, rows - 2LL * wpad) + 2LL * wpad);
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x / 32) + threadIdx.x / 32; r < end; r += warps) {
    const long long s = r - wpad;
    const bool in = s >= 0 && s < S;
    const float* row = src + (in ? s : 0) * width;
    __nv_bfloat16* d = dst + r * width;
    const double pos = kRot && in ? static_cast<double>(positions[s]) : 0.0;
    for (int c = V * lane; c < width; c += 32 * V) {
      float x[V];
#pragma unroll
      for (int t = 0; t < V; ++t) x[t] = 0.f;
      if (in) {
        if constexpr (V == 4) {
          if (vec) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(row + c));
            x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
          }
        } else if constexpr (V == 2) {
          if (vec) {
            const float2 v = __ldg(reinterpret_cast<const float2*>(row + c));
            x[0] = v.x, x[1] = v.y;
          }
        }
        if (V == 1 || !vec) {
#pragma unroll
          for (int t = 0; t < V; ++t) x[t] = __ldg(row + c + t);
        }
        if constexpr (kRot) {
#pragma unroll
          for (int t = 0; t < V; t += 2) rotate_pair_bf16_path(x[t], x[t + 1], pos * pad_inv[(c + t) / 2]);
        }
      }
      if constexpr (V == 1) {
        d[c] = __float2bfloat16_rn(x[0]);
      } else {
        // dst comes from cudaMallocAsync and V divides width, so these stores are aligned.
        __nv_bfloat162* d2 = reinterpret_cast<__nv_bfloat162*>(d + c);
        if constexpr (V == 4) {
          uint2 u;
          const __nv_bfloat162 lo = __floats2bfloat162_rn(x[0], x[1]), hi = __floats2bfloat162_rn(x[2], x[3]);
          u.x = *reinterpret_cast<const unsigned*>(&lo);
          u.y = *reinterpret_cast<const unsigned*>(&hi);
          *reinterpret_cast<uint2*>(d2) = u;
        } else {
          d2[0] = __floats2bfloat162_rn(x[0], x[1]);
        }
      }
    }
  }
}

/// The caller-written padded operands of one call (LocalAttentionInputs::*_padded), at most four.
struct PaddedTails {
  __nv_bfloat16* dst[4];
  int width[4];
  int n;
};

/// Zeros, in padded buffer blockIdx.y of t, the rows [wpad + S, end) with `end` as in pad_bf16_kernel: the rows
/// past S that the running chunks read, which pad_bf16_kernel writes as zeros; so a caller's buffer then holds
/// the same bytes as the attention's own copy, whatever an earlier call with a larger S left there. Rows are
/// contiguous, so this is one range, cleared 8 bf16 at a time between its 16-byte boundaries.
__global__ void zero_padded_tails_kernel(PaddedTails t, long long rows, int wpad, const int* __restrict__ count,
                                         int chunk) {
  const int S = *count;
  const long long end = min(rows, detail::bounded_rows(S, chunk, rows - 2LL * wpad) + 2LL * wpad);
  __nv_bfloat16* dst = t.dst[blockIdx.y];
  const long long w = t.width[blockIdx.y];
  detail::zero_bf16_range(dst, (wpad + static_cast<long long>(S)) * w, end * w,
                          blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x,
                          static_cast<long long>(gridDim.x) * blockDim.x);
}

/// Everything the band kernels need besides LocalAttentionParams. chunk: slots per chunk of the bounded band
/// products (0: the products run on every block).
struct BandParams {
  int nb, wpad, wlo, width, chunk;
};

/// The band rows [0, bound) that the running chunks of the band products compute: S rounded up to a chunk.
__device__ __forceinline__ int band_row_bound(const BandParams& g, int S) {
  return static_cast<int>(detail::bounded_rows(S, g.chunk, static_cast<long long>(g.nb) * kBandRows));
}

/// The visible key slots of query i (row [rb, re)) form the contiguous range [lo, hi) (key_valid aside).
__device__ __forceinline__ void visible_range(const LocalAttentionParams& p, int i, int rb, int re, int& lo, int& hi) {
  lo = max(rb, i - p.window);
  hi = p.causal ? i + 1 : min(re, i + p.window + 1);
}

/// Forward elementwise pass, one warp per band row i: x = score + bias where visible; weights to `pq` (bf16, zero
/// where invisible and for rows >= S), the softmax log-sum-exp to row_stat (rows < S; +inf without a visible key).
/// Only the rows of the running chunks (band_row_bound): the others are neither read nor written.
__global__ void band_forward_kernel(const LocalAttentionParams p, const BandParams g, const float* __restrict__ sband,
                                    __nv_bfloat16* __restrict__ pq) {
  const int S = p.offsets[p.batch];
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  const int n = band_row_bound(g, S);
  const WeightDropout drop(p);
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
        const float a = vis ? expf(x - m) * inv : 0.f;
        prow[c] = __float2bfloat16_rn(drop.on && vis ? a * drop(i, base + c) : a);
      }
      if (lane == 0 && p.row_stat) p.row_stat[i] = l > 0.f ? m + logf(l) : INFINITY;
    } else {
      for (int c = lane; c < g.width; c += 32) {
        bool vis;
        const float x = score(c, vis);
        const float a = vis ? activate(p.activation, x) : 0.f;
        prow[c] = __float2bfloat16_rn(drop.on && vis ? a * drop(i, base + c) : a);
      }
    }
  }
}

}  // namespace

/// The chunk of the bounded band products, in blocks of kBandRows slots: about 16 chunks over the blocks, so
/// the products cost about ceil(16 S / capacity) / 16 of their full size. 0 when bounded_gemm runs in full mode
/// (the kernels then also cover every row, as the full products read them).
inline int band_chunk_blocks(const BandGeometry& g) {
  if (bounded_gemm_mode() == BoundedGemmMode::full) return 0;
  return std::max(1, (g.nb + 15) / 16);
}

/// A product over the blocks (batch entries of kBandRows rows), bounded by S = *count: C[t] (M x N, ldc) =
/// alpha A[t] (M x K, lda) op(B[t]) for the blocks t < batch of the running chunks; op(B) = B^T with B (N x K, ldb)
/// when b_nk, else B (K x N, ldb). bf16 operands, fp32 accumulation and result.
inline BoundedGemm band_product(bool b_nk, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
                                long long sa, const __nv_bfloat16* B, int ldb, long long sb, float* C, int ldc,
                                long long sc, int batch, int chunk_blocks) {
  BoundedGemm x = bf16_product(false, b_nk, M, N, K, A, lda, B, ldb, C, ldc);
  x.alpha = alpha;
  x.stride_a = sa;
  x.stride_b = sb;
  x.stride_c = sc;
  x.batch = batch;
  x.bound = GemmBound::batch;
  x.chunk = chunk_blocks;
  x.rows_per_entry = kBandRows;
  return x;
}

inline void band_gemm(const int* count, int chunk_blocks, bool b_nk, int M, int N, int K, float alpha,
                      const __nv_bfloat16* A, int lda, long long sa, const __nv_bfloat16* B, int ldb, long long sb,
                      float* C, int ldc, long long sc, int batch, cudaStream_t s) {
  const BoundedGemm x = band_product(b_nk, M, N, K, alpha, A, lda, sa, B, ldb, sb, C, ldc, sc, batch, chunk_blocks);
  detail::bounded_gemm(&x, 1, count, s);
}

/// A product whose result rows are slots (out, dq, dk, dv: `capacity` rows), appended to x: full blocks batched,
/// the last partial block as one more product, so nothing past row capacity is written. Returns the products added.
inline int band_rows_products(BoundedGemm* x, int chunk_blocks, int capacity, int N, int K, float alpha,
                              const __nv_bfloat16* A, int lda, long long sa, const __nv_bfloat16* B, int ldb,
                              long long sb, float* C, int ldc) {
  const int full = capacity / kBandRows, tail = capacity - full * kBandRows;
  const long long sc = static_cast<long long>(kBandRows) * ldc;
  x[0] = band_product(false, kBandRows, N, K, alpha, A, lda, sa, B, ldb, sb, C, ldc, sc, full, chunk_blocks);
  if (tail == 0) return 1;
  x[1] = band_product(false, tail, N, K, alpha, A + full * sa, lda, sa, B + full * sb, ldb, sb, C + full * sc, ldc,
                      sc, 1, 1);
  x[1].first_row = static_cast<long long>(full) * kBandRows;
  return 2;
}

inline int band_grid(long long n, int per_block) {
  return static_cast<int>(std::min<long long>(std::max<long long>((n + per_block - 1) / per_block, 1), 132LL * 32));
}

/// The padded bf16 copy of src (capacity, width): see pad_bf16_kernel.
inline void launch_pad_bf16(const float* src, __nv_bfloat16* dst, int width, const BandGeometry& g,
                            const LocalAttentionInputs& in, const LocalAttentionConfig& cfg, bool rotary,
                            int chunk_blocks, cudaStream_t s) {
  const auto a = reinterpret_cast<std::uintptr_t>(src);
  const int grid = band_grid(g.rows, 8);
  const std::size_t smem = rotary ? static_cast<std::size_t>(width / 2) * sizeof(double) : 0;
  const auto go = [&](auto kernel, int vec) {
    kernel<<<grid, 256, smem, s>>>(src, dst, width, g.rows, g.wpad, in.offsets, in.batch, in.positions,
                                   cfg.rotary_theta, vec, chunk_blocks * kBandRows);
  };
  if (width % 4 == 0) {
    const int vec = (a & 15u) == 0;
    if (rotary) go(pad_bf16_kernel<4, true>, vec);
    else go(pad_bf16_kernel<4, false>, vec);
  } else if (width % 2 == 0) {
    const int vec = (a & 7u) == 0;
    if (rotary) go(pad_bf16_kernel<2, true>, vec);
    else go(pad_bf16_kernel<2, false>, vec);
  } else {
    go(pad_bf16_kernel<1, false>, 0);  // rotary widths are even (validate)
  }
  SMA_CUDA_CHECK_LAUNCH();
}

/// The padded copy of one operand: the caller's buffer when given (its tail is cleared later, with the others', by
/// zero_padded_tails), else a workspace copy written by pad_bf16_kernel from src.
inline __nv_bfloat16* padded_operand(void* given, const float* src, int width, bool rotary, const BandGeometry& g,
                                     const LocalAttentionInputs& in, const LocalAttentionConfig& cfg,
                                     int chunk_blocks, AsyncWorkspace& ws, PaddedTails& tails, cudaStream_t s) {
  if (given) {
    auto* d = static_cast<__nv_bfloat16*>(given);
    tails.dst[tails.n] = d;
    tails.width[tails.n] = width;
    ++tails.n;
    return d;
  }
  __nv_bfloat16* d = ws.alloc<__nv_bfloat16>(g.rows * width);
  launch_pad_bf16(src, d, width, g, in, cfg, rotary, chunk_blocks, s);
  return d;
}

/// One launch for the tails of every caller-written operand of the call (none: nothing).
inline void zero_padded_tails(const PaddedTails& t, const BandGeometry& g, const LocalAttentionInputs& in,
                              int chunk_blocks, cudaStream_t s) {
  if (t.n == 0) return;
  int width = 0;
  for (int i = 0; i < t.n; ++i) width = std::max(width, t.width[i]);
  // At most a chunk less one row past S, plus the W' rows of the right-hand padding.
  const long long tail = chunk_blocks > 0 ? std::min<long long>(g.rows, 1LL * chunk_blocks * kBandRows + g.wpad)
                                          : g.rows;
  const dim3 grid(band_grid((tail * width + 7) / 8 + 2, 256), t.n);
  zero_padded_tails_kernel<<<grid, 256, 0, s>>>(t, g.rows, g.wpad, in.offsets + in.batch, chunk_blocks * kBandRows);
  SMA_CUDA_CHECK_LAUNCH();
}

/// Bytes of the padded copies the attention makes itself (operands the caller did not give), for retain_workspace.
inline long long own_padded_bytes(const BandGeometry& g, const void* given, int width) {
  return given ? 0 : g.rows * width * 2;
}

/// Lets the stream-ordered pool of the current device keep `bytes` across synchronisations. The default release
/// threshold (0) hands the pool's memory back at every synchronisation, so each call would map its workspace
/// (hundreds of MB at the issue's shape) afresh, which measurably costs time. The threshold is only raised. While
/// `s` is being captured into a graph the pool may not be queried (cudaErrorStreamCaptureUnsupported); nothing is
/// lost by skipping, because a graph's allocations are its own and the plain steps before it raised the threshold.
inline void retain_workspace(std::size_t bytes, cudaStream_t s) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  SMA_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  int dev = 0;
  SMA_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t pool;
  SMA_CUDA_CHECK(cudaDeviceGetMemPool(&pool, dev));
  std::uint64_t threshold = 0;  // the attribute is a cuuint64_t (64 bits)
  SMA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  if (threshold < bytes) {
    threshold = bytes;
    SMA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
}

inline BandParams band_params(const BandGeometry& g, int chunk_blocks) {
  return BandParams{g.nb, g.wpad, g.wlo, g.width, chunk_blocks * kBandRows};
}

/// The bf16 forward (local_attention_forward when cfg.bf16): scores band, weights band, out.
inline void local_attention_forward_bf16(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                                         LocalAttentionParams p, float* out, cudaStream_t s) {
  const BandGeometry g(cfg, in.capacity);
  const long long own = own_padded_bytes(g, in.q_padded, in.z) + own_padded_bytes(g, in.k_padded, in.z) +
                        own_padded_bytes(g, in.v_padded, in.h);
  retain_workspace(static_cast<std::size_t>(own + g.band() * 6 + (4 << 20)), s);
  AsyncWorkspace ws(s);
  const bool rot = cfg.position == Position::rotary;
  const int cb = band_chunk_blocks(g);
  const int* count = in.offsets + in.batch;
  PaddedTails tails{};
  __nv_bfloat16* qp = padded_operand(in.q_padded, in.q, in.z, rot, g, in, cfg, cb, ws, tails, s);
  __nv_bfloat16* kp = padded_operand(in.k_padded, in.k, in.z, rot, g, in, cfg, cb, ws, tails, s);
  __nv_bfloat16* vp = padded_operand(in.v_padded, in.v, in.h, false, g, in, cfg, cb, ws, tails, s);
  zero_padded_tails(tails, g, in, cb, s);
  float* sband = ws.alloc<float>(g.band());
  __nv_bfloat16* pq = ws.alloc<__nv_bfloat16>(g.band());
  const long long blk = kBandRows;
  // scores: block t's queries (padded rows W' + 64t ...) against its key window (padded rows 64t ...).
  band_gemm(count, cb, true, kBandRows, g.width, in.z, p.scale, qp + g.wpad * static_cast<long long>(in.z), in.z,
            blk * in.z, kp, in.z, blk * in.z, sband, g.width, blk * g.width, g.nb, s);
  band_forward_kernel<<<band_grid(g.nb * blk, 8), 256, 0, s>>>(p, band_params(g, cb), sband, pq);
  SMA_CUDA_CHECK_LAUNCH();
  BoundedGemm x[2];
  const int n = band_rows_products(x, cb, in.capacity, in.h, g.width, 1.f, pq, g.width, blk * g.width, vp, in.h,
                                   blk * in.h, out, in.h);
  detail::bounded_gemm(x, n, count, s);
}

}  // namespace sma::cuda::attn
