// cuda/local_attention/band_bf16_bwd.cuh: the backward of the bf16 band path (band_bf16.cuh says why and how the
// bands are laid out). Products: scores S = Q' K'^T and dA = dout V^T over the query-major band; an elementwise pass
// gives the weights A and dS (bf16) and, with a bias table, dS in fp32; 64 x 64 tile transposes give the key-major
// bands A^T and dS^T; then dq = scale dS K', dk = scale dS^T Q', dv = A^T dout, each a batched product over blocks
// of 64 slots (no two blocks write the same row, so no atomics and nothing order-dependent). The bias gradient:
// per block of 64 queries, each table entry summed in double by one thread in a fixed order, then the blocks added
// in a fixed order by bias_reduce_kernel (backward_kernel.cuh), as in the fp32 path.
#pragma once

#include "backward_kernel.cuh"
#include "band_bf16.cuh"

namespace sma::cuda::attn {

namespace {

/// Backward elementwise pass, one warp per band row i (rows >= S: zeros). In: scores (sband) and dA (dband, fp32).
/// Out: weights aq and dS dsq (bf16); dS in fp32 over dband when ds32 (the bias gradient's input). Rows up to
/// W' past the running chunks' bound: the key-major tiles of the running key blocks come from those rows.
__global__ void band_backward_kernel(const LocalAttentionBackwardParams p, const BandParams g,
                                     const float* __restrict__ sband, float* __restrict__ dband,
                                     __nv_bfloat16* __restrict__ aq, __nv_bfloat16* __restrict__ dsq, int ds32) {
  const int S = p.offsets[p.batch];
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  const int n = min(g.nb * kBandRows, band_row_bound(g, S) + g.wpad);
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  const WeightDropout drop(p);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < n; i += warps) {
    const long long o = static_cast<long long>(i) * g.width;
    if (i >= S) {
      for (int c = lane; c < g.width; c += 32) {
        aq[o + c] = zero;
        dsq[o + c] = zero;
        if (ds32) dband[o + c] = 0.f;
      }
      continue;
    }
    const int b = find_row(p.offsets, p.batch, i);
    const int rb = p.offsets[b], re = p.offsets[b + 1];
    const int pos_i = p.positions ? p.positions[i] : 0;
    const int base = i / kBandRows * kBandRows - g.wpad;
    int lo, hi;
    visible_range(p, i, rb, re, lo, hi);
    const float lse = p.activation == kSoftmax ? p.lse[i] : 0.f;
    const float delta = p.activation == kSoftmax ? p.delta[i] : 0.f;
    for (int c = lane; c < g.width; c += 32) {
      const int j = base + c;
      float a = 0.f, ds = 0.f;
      if (j >= lo && j < hi && (!p.key_valid || p.key_valid[j])) {
        const float x = sband[o + c] + bias_value(p, i, j, pos_i, p.positions ? p.positions[j] : 0);
        const float m = drop.on ? drop(i, j) : 1.f;  // dA = m (dout V^T); dv = (m A)^T dout
        a = pair_weight(p.activation, x, lse);
        ds = score_grad(p.activation, x, drop.on ? dband[o + c] * m : dband[o + c], lse, delta);
        if (drop.on) a *= m;
      }
      aq[o + c] = __float2bfloat16_rn(a);
      dsq[o + c] = __float2bfloat16_rn(ds);
      if (ds32) dband[o + c] = ds;
    }
  }
}

/// Key-major bands from the query-major ones: tile (key block kb, tile t') = transpose of (query block
/// kb - wlo/64 + t', tile wpad/64 + kb - qb); zero where that query block does not exist. blockDim (32, 8).
/// Key blocks past the running chunks' bound are skipped (their products do not run).
__global__ void band_transpose_kernel(const BandParams g, const int* __restrict__ count,
                                      const __nv_bfloat16* __restrict__ a_src, const __nv_bfloat16* __restrict__ b_src,
                                      __nv_bfloat16* __restrict__ a_dst, __nv_bfloat16* __restrict__ b_dst) {
  __shared__ __nv_bfloat16 ta[kBandRows][kBandRows + 2], tb[kBandRows][kBandRows + 2];
  const int kb = blockIdx.x, tk = blockIdx.y;
  if (kb * kBandRows >= band_row_bound(g, *count)) return;
  const int qb = kb - g.wlo / kBandRows + tk, tq = g.wpad / kBandRows + kb - qb;
  const bool have = qb >= 0 && qb < g.nb;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (have) {
    for (int r = ty; r < kBandRows; r += 8) {
      const long long o = static_cast<long long>(qb * kBandRows + r) * g.width + tq * kBandRows;
      ta[r][tx] = a_src[o + tx];
      ta[r][tx + 32] = a_src[o + tx + 32];
      tb[r][tx] = b_src[o + tx];
      tb[r][tx + 32] = b_src[o + tx + 32];
    }
  }
  __syncthreads();
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  for (int r = ty; r < kBandRows; r += 8) {  // r: key within the block; columns: queries
    const long long o = static_cast<long long>(kb * kBandRows + r) * g.width + tk * kBandRows;
    a_dst[o + tx] = have ? ta[tx][r] : zero;
    a_dst[o + tx + 32] = have ? ta[tx + 32][r] : zero;
    b_dst[o + tx] = have ? tb[tx][r] : zero;
    b_dst[o + tx + 32] = have ? tb[tx + 32][r] : zero;
  }
}

constexpr int kDbiasStagedKeys = 2048;  // key positions of a band row kept in shared memory when the band is narrower
constexpr int kDbiasWindow = 4096;      // table entries accumulated in shared memory per pass over the block's rows
constexpr int kDbiasPrefetchRows = 8;   // band rows whose first values are loaded ahead of their additions
constexpr int kDbiasPrefetchCols = 2;   // ... columns per thread and row (2 x 256 threads: bands up to 512 wide)
static_assert(kBandRows % kDbiasPrefetchRows == 0, "the prefetched row groups tile the block's rows");

/// The bias gradient of block blockIdx.x (64 queries) from the fp32 dS band: partial[block, e] for e in the
/// block's [lo, hi) (written to range). The rows are added in order into a double accumulator in shared memory:
/// within a row the index is nondecreasing along the visible keys, so the keys with one index form a run, and the
/// thread at a run's head adds the run's sum; no two threads touch one entry in a row, and a barrier separates the
/// rows, so the order of the additions is fixed. (Summing each entry over the rows by binary search, as before,
/// took 0.32 ms per layer at the training step's shape.) Ranges wider than kDbiasWindow take several passes.
__global__ void band_dbias_kernel(const LocalAttentionBackwardParams p, const BandParams g,
                                  const float* __restrict__ dsband) {
  __shared__ int r_a[kBandRows], r_e[kBandRows], r_uf[kBandRows], r_ul[kBandRows], r_pos[kBandRows];
  __shared__ int k_pos[kDbiasStagedKeys];
  __shared__ double acc[kDbiasWindow];
  __shared__ int s_lo, s_hi;
  const int S = p.offsets[p.batch];
  const int q0 = blockIdx.x * kBandRows, tid = threadIdx.x;
  const int base = q0 - g.wpad;
  const bool staged = p.position == kPosSimple && g.width <= kDbiasStagedKeys;
  if (staged)
    for (int c = tid; c < g.width; c += blockDim.x) {
      const int j = base + c;
      k_pos[c] = j >= 0 && j < S ? p.positions[j] : 0;
    }
  if (tid < kBandRows) {
    const int i = q0 + tid;
    int a = 0, e = 0, uf = 0x7fffffff, ul = -0x7fffffff, pos = 0;
    if (i < S) {
      const int b = find_row(p.offsets, p.batch, i);
      int lo, hi;
      visible_range(p, i, p.offsets[b], p.offsets[b + 1], lo, hi);
      pos = p.positions ? p.positions[i] : 0;
      if (lo < hi) {
        a = lo - base;
        e = hi - base;
        uf = bias_index(p, i, lo, pos, p.positions ? p.positions[lo] : 0);
        ul = bias_index(p, i, hi - 1, pos, p.positions ? p.positions[hi - 1] : 0);
      }
    }
    r_a[tid] = a;
    r_e[tid] = e;
    r_uf[tid] = uf;
    r_ul[tid] = ul;
    r_pos[tid] = pos;
  }
  __syncthreads();
  if (tid == 0) {
    int lo = 0x7fffffff, hi = -0x7fffffff;
    for (int r = 0; r < kBandRows; ++r) {
      lo = min(lo, r_uf[r]);
      hi = max(hi, r_ul[r]);
    }
    if (lo > hi) lo = hi = 0;
    else ++hi;
    s_lo = lo;
    s_hi = hi;
    p.dbias_range[2 * blockIdx.x] = lo;
    p.dbias_range[2 * blockIdx.x + 1] = hi;
  }
  __syncthreads();
  double* part = p.dbias_partial + static_cast<long long>(blockIdx.x) * p.table_size;
  const auto u = [&](int r, int c) {
    const int j = base + c;
    return bias_index(p, q0 + r, j, r_pos[r], staged ? k_pos[c] : (p.positions ? p.positions[j] : 0));
  };
  const auto first = [&](int r, int e) {  // row r's first band column with index >= e (binary search)
    int lo = r_a[r], hi = r_e[r];
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (u(r, mid) < e) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  // The two clamped ends of the simple table can collect most of every row (positions further apart than P - 1):
  // a warp takes each of them below, its lanes striding over the run, then a fixed shuffle tree.
  const int top = 2 * p.max_positions - 2;
  const bool clamp_lo = p.position == kPosSimple && s_lo == 0 && s_lo < s_hi;
  const bool clamp_hi = p.position == kPosSimple && top > 0 && s_hi - 1 == top && s_lo < s_hi;
  const auto clamped = [&](int e) { return (clamp_lo && e == 0) || (clamp_hi && e == top); };
  for (int w0 = s_lo; w0 < s_hi; w0 += kDbiasWindow) {
    const int w1 = min(s_hi, w0 + kDbiasWindow);
    for (int e = tid; e < w1 - w0; e += blockDim.x) acc[e] = 0.0;
    __syncthreads();
    for (int r0 = 0; r0 < kBandRows; r0 += kDbiasPrefetchRows) {
      // The loads of a group of rows are issued before its additions: with one row per barrier the block waited
      // out a global load's latency 64 times (0.09 ms per layer at the training step's shape).
      float first[kDbiasPrefetchRows][kDbiasPrefetchCols];
#pragma unroll
      for (int gr = 0; gr < kDbiasPrefetchRows; ++gr) {
        const float* row = dsband + static_cast<long long>(q0 + r0 + gr) * g.width;
#pragma unroll
        for (int k = 0; k < kDbiasPrefetchCols; ++k) {
          const int c = r_a[r0 + gr] + tid + k * static_cast<int>(blockDim.x);
          first[gr][k] = c < r_e[r0 + gr] ? row[c] : 0.f;
        }
      }
#pragma unroll
      for (int gr = 0; gr < kDbiasPrefetchRows; ++gr) {
        const int r = r0 + gr;
        if (r_ul[r] >= w0 && r_uf[r] < w1) {  // shared values: the whole block skips the row together
          const float* row = dsband + static_cast<long long>(q0 + r) * g.width;
          // Adds the run of equal indices starting at column c (value v) when c is its head, in column order.
          const auto add_run = [&](int c, float v) {
            const int e = u(r, c);
            if (e < w0 || e >= w1 || clamped(e) || (c > r_a[r] && u(r, c - 1) == e)) return;
            double sum = static_cast<double>(v);
            for (int k = c + 1; k < r_e[r] && u(r, k) == e; ++k) sum += static_cast<double>(row[k]);
            acc[e - w0] += sum;
          };
#pragma unroll
          for (int k = 0; k < kDbiasPrefetchCols; ++k) {
            const int c = r_a[r] + tid + k * static_cast<int>(blockDim.x);
            if (c < r_e[r]) add_run(c, first[gr][k]);
          }
          for (int c = r_a[r] + tid + kDbiasPrefetchCols * static_cast<int>(blockDim.x); c < r_e[r];
               c += blockDim.x)
            add_run(c, row[c]);
        }
        __syncthreads();
      }
    }
    for (int e = tid; e < w1 - w0; e += blockDim.x)
      if (!clamped(w0 + e)) part[w0 + e] = acc[e];
    __syncthreads();
  }
  const int warp = tid / 32, lane = tid % 32;
  if ((warp == 0 && clamp_lo) || (warp == 1 && clamp_hi)) {
    const int e = warp == 0 ? 0 : top;
    double sum = 0.0;
    for (int r = 0; r < kBandRows; ++r) {
      if (e < r_uf[r] || e > r_ul[r]) continue;
      const int c0 = e == r_uf[r] ? r_a[r] : first(r, e);
      const int c1 = e == r_ul[r] ? r_e[r] : first(r, e + 1);
      const float* row = dsband + static_cast<long long>(q0 + r) * g.width;
      for (int c = c0 + lane; c < c1; c += 32) sum += static_cast<double>(row[c]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) part[e] = sum;
  }
}

}  // namespace

/// The bf16 backward (local_attention_backward when cfg.bf16). p: the parameter block with dout, dq, dk, dv, lse,
/// delta set (q, k: the caller's, unrotated: rotation happens in the padded copies).
inline void local_attention_backward_bf16(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                                          LocalAttentionBackwardParams p, float* dbias_table, cudaStream_t s) {
  const BandGeometry g(cfg, in.capacity);
  const long long table_bytes = p.table_size > 0 ? static_cast<long long>(g.nb) * p.table_size * 8 : 0;
  const long long own = own_padded_bytes(g, in.q_padded, in.z) + own_padded_bytes(g, in.k_padded, in.z) +
                        own_padded_bytes(g, in.v_padded, in.h) + own_padded_bytes(g, in.dout_padded, in.h);
  retain_workspace(static_cast<std::size_t>(own + g.band() * 16 + table_bytes + in.capacity * 4LL + (4 << 20)), s);
  AsyncWorkspace ws(s);
  const bool rot = cfg.position == Position::rotary;
  const int cb = band_chunk_blocks(g);
  const int* count = in.offsets + in.batch;
  const long long Z = in.z, H = in.h, blk = kBandRows;
  // Caller-written operands (LocalAttentionInputs::*_padded) get their tails cleared again: the contract asks
  // nothing of the caller between the forward and the backward.
  PaddedTails tails{};
  __nv_bfloat16* qp = padded_operand(in.q_padded, in.q, in.z, rot, g, in, cfg, cb, ws, tails, s);
  __nv_bfloat16* kp = padded_operand(in.k_padded, in.k, in.z, rot, g, in, cfg, cb, ws, tails, s);
  __nv_bfloat16* vp = padded_operand(in.v_padded, in.v, in.h, false, g, in, cfg, cb, ws, tails, s);
  __nv_bfloat16* dop = padded_operand(in.dout_padded, p.dout, in.h, false, g, in, cfg, cb, ws, tails, s);
  zero_padded_tails(tails, g, in, cb, s);
  float* sband = ws.alloc<float>(g.band());
  float* dband = ws.alloc<float>(g.band());
  __nv_bfloat16* aq = ws.alloc<__nv_bfloat16>(g.band());
  __nv_bfloat16* dsq = ws.alloc<__nv_bfloat16>(g.band());
  __nv_bfloat16* ak = ws.alloc<__nv_bfloat16>(g.band());
  __nv_bfloat16* dsk = ws.alloc<__nv_bfloat16>(g.band());
  const long long qoff = g.wpad;            // padded row of slot 64t: the queries of block t
  const long long koff = g.wpad - g.wlo;    // padded row of the first query of key block t's window
  // S and dA in one graph (independent products).
  BoundedGemm sd[2];
  sd[0] = band_product(true, kBandRows, g.width, in.z, p.scale, qp + qoff * Z, in.z, blk * Z, kp, in.z, blk * Z, sband,
                       g.width, blk * g.width, g.nb, cb);
  sd[1] = band_product(true, kBandRows, g.width, in.h, 1.f, dop + qoff * H, in.h, blk * H, vp, in.h, blk * H, dband,
                       g.width, blk * g.width, g.nb, cb);
  detail::bounded_gemm(sd, 2, count, s);
  const bool table = p.table_size > 0;
  band_backward_kernel<<<band_grid(g.nb * blk, 8), 256, 0, s>>>(p, band_params(g, cb), sband, dband, aq, dsq,
                                                                table ? 1 : 0);
  SMA_CUDA_CHECK_LAUNCH();
  band_transpose_kernel<<<dim3(g.nb, g.width / kBandRows), dim3(32, 8), 0, s>>>(band_params(g, cb), count, aq, dsq,
                                                                                ak, dsk);
  SMA_CUDA_CHECK_LAUNCH();
  const long long sband_stride = blk * g.width;
  // dq, dk, dv in one graph (they write different tensors).
  BoundedGemm x[6];
  int n = band_rows_products(x, cb, in.capacity, in.z, g.width, p.scale, dsq, g.width, sband_stride, kp, in.z, blk * Z,
                             p.dq, in.z);
  n += band_rows_products(x + n, cb, in.capacity, in.z, g.width, p.scale, dsk, g.width, sband_stride, qp + koff * Z,
                          in.z, blk * Z, p.dk, in.z);
  n += band_rows_products(x + n, cb, in.capacity, in.h, g.width, 1.f, ak, g.width, sband_stride, dop + koff * H, in.h,
                          blk * H, p.dv, in.h);
  detail::bounded_gemm(x, n, count, s);
  if (table) {
    p.dbias_partial = ws.alloc<double>(static_cast<long long>(g.nb) * p.table_size);
    p.dbias_range = ws.alloc<int>(2LL * g.nb);
    band_dbias_kernel<<<g.nb, 256, 0, s>>>(p, band_params(g, cb), dband);
    SMA_CUDA_CHECK_LAUNCH();
    bias_reduce_kernel<<<bias_reduce_blocks(p.table_size), 256, 0, s>>>(p.dbias_partial, p.dbias_range, g.nb,
                                                                        p.table_size, dbias_table);
    SMA_CUDA_CHECK_LAUNCH();
  }
  if (rot) {
    launch_rotary(p.dq, p.dq, in, cfg.rotary_theta, -1.0, s, false);
    launch_rotary(p.dk, p.dk, in, cfg.rotary_theta, -1.0, s, false);
  }
}

}  // namespace sma::cuda::attn
