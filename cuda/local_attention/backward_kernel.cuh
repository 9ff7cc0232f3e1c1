// cuda/local_attention/backward_kernel.cuh: the fused backward, FlashAttention style (scores recomputed per tile,
// nothing of size S x W stored), as three band kernels that never write the same element twice, so every result is
// deterministic without atomics:
//   dq kernel   64 queries per CTA: S, dA = dout V^T (over H), dS, dq = scale dS K'; with a bias table it also
//               writes dS into a band (p.dsband), from which band_dbias_kernel (band_bf16_bwd.cuh) sums the bias
//               gradient per block of 64 queries in a fixed order and bias_reduce_kernel adds the blocks in order.
//               (Summing it inside this kernel by a binary search per entry and row doubled the kernel's time.)
//   dk kernel   64 keys per CTA: S^T, dA^T, dS^T, dk = dS^T Q'.
//   dv kernel   64 keys x kBlockN columns per CTA: S^T, A^T, dv = A^T dout.
// dS_ij = relu2: 2 relu(s) dA; laplace: phi'(s) dA; softmax: a (dA - delta_i), delta_i = dout_i . out_i; with
// attention dropout dA = m (dout V^T) and dv = (m A)^T dout (m: WeightDropout, recomputed).
#pragma once

#include "tile.cuh"

#include <algorithm>

namespace sma::cuda::attn {

/// d loss / d score of one visible pair from its score x (bias included) and dA; lse and delta: the query's.
__device__ __forceinline__ float score_grad(int act, float x, float da, float lse, float delta) {
  if (act == kSoftmax) return expf(x - lse) * (da - delta);
  return activate_grad(act, x) * da;
}

/// Attention weight of one visible pair (softmax from the saved log-sum-exp).
__device__ __forceinline__ float pair_weight(int act, float x, float lse) {
  return act == kSoftmax ? expf(x - lse) : activate(act, x);
}

/// kDropout: attention dropout on (second instantiations of the kernels, which keep their registers without it).
template <class Tr, bool kDropout = false>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksBwd) local_attention_dq_kernel(const LocalAttentionBackwardParams p) {
  constexpr int M = Tr::kBlockM, C = Tr::kChunk, NS = Tr::kNsZ;
  __shared__ __align__(16) float stage[Tr::kStageFloats];
  __shared__ __align__(16) float dst[Tr::kTileFloats];  // dS, key-major: dst[c * kLd + r]
  __shared__ int q_rb[M], q_re[M], q_pos[M], k_pos[C], k_ok[C];
  __shared__ float q_lse[M], q_delta[M];

  const bool has_table = p.table_size > 0;
  const int S = p.offsets[p.batch];
  const int q0 = blockIdx.x * M;
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  if (q0 >= S) return;
  const int nq = min(M, S - q0);
  const int W = p.window;

  if (tid < M) {
    const int i = q0 + tid;
    int rb = 0, re = 0, pos = 0;
    float lse = 0.f, delta = 0.f;
    if (tid < nq) {
      const int b = find_row(p.offsets, p.batch, i);
      rb = p.offsets[b];
      re = p.offsets[b + 1];
      pos = p.positions ? p.positions[i] : 0;
      if (p.activation == kSoftmax) {
        lse = p.lse[i];
        delta = p.delta[i];
      }
    }
    q_rb[tid] = rb;
    q_re[tid] = re;
    q_pos[tid] = pos;
    q_lse[tid] = lse;
    q_delta[tid] = delta;
  }
  __syncthreads();
  const int k_begin = max(q_rb[0], q0 - W);
  const int k_end = p.causal ? q0 + nq : min(q_re[nq - 1], q0 + nq + W);

  float acc[4][4 * NS];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4 * NS; ++j) acc[i][j] = 0.f;

  for (int kc = k_begin; kc < k_end; kc += C) {
    const int nk = min(C, k_end - kc);
    __syncthreads();
    if (tid < C) {
      const int j = kc + tid;
      const bool in = tid < nk;
      k_pos[tid] = in && p.positions ? p.positions[j] : 0;
      k_ok[tid] = in && (!p.key_valid || p.key_valid[j]) ? 1 : 0;
    }
    float s[4][4], da[4][4];
    tile_dot<Tr>(s, stage, p.q, q0, nq, p.scale, p.k, kc, nk, 1.f, p.z, p.vec_z, tm, tn);
    tile_dot<Tr>(da, stage, p.dout, q0, nq, 1.f, p.v, kc, nk, 1.f, p.h, p.vec_h, tm, tn);
    const WeightDropout drop(p);  // per chunk, so that its registers live only here
    float g[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * tm + i, qi = q0 + r;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * tn + j, kj = kc + c;
        const bool vis = r < nq && k_ok[c] && in_window(p, qi, q_rb[r], q_re[r], kj);
        g[i][j] = vis ? score_grad(p.activation, s[i][j] + bias_value(p, qi, kj, q_pos[r], k_pos[c]),
                                   kDropout ? da[i][j] * drop(qi, kj) : da[i][j], q_lse[r], q_delta[r])
                      : 0.f;
      }
    }
    store_transposed<Tr>(dst, g, tm, tn);
    __syncthreads();

    if (has_table) {  // dS into the band: row qi, column kj - (q0 - wpad)
      const int base = q0 - p.band_wpad;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 4 * tm + i;
        if (r >= nq) continue;
        float* row = p.dsband + static_cast<long long>(q0 + r) * p.band_width + (kc - base);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (4 * tn + j < nk) row[4 * tn + j] = g[i][j];
      }
    }

    tile_stream<Tr, Tr::kMaxZ>(acc, dst, stage, p.k, p.z, kc, nk, 0, 1.f, p.vec_z, tm, tn);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * tm + i;
    if (r >= nq) continue;
    const long long qi = q0 + r;
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = 64 * s + 4 * tn + j;
        if (col < p.z) p.dq[qi * p.z + col] = p.scale * acc[i][4 * s + j];
      }
  }
}

/// Key-major kernels: 64 keys per CTA, walking the queries that can see them. kDv: dv over kBlockN columns of H
/// (gridDim.y splits H); otherwise dk over all of Z.
template <class Tr, bool kDv, bool kDropout = false>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksBwd) local_attention_dkv_kernel(const LocalAttentionBackwardParams p) {
  constexpr int M = Tr::kBlockM, C = Tr::kChunk, NS = kDv ? Tr::kNsH : Tr::kNsZ;
  __shared__ __align__(16) float stage[Tr::kStageFloats];
  __shared__ __align__(16) float tile[Tr::kTileFloats];  // A or dS, query-major: tile[r * kLd + c]
  __shared__ int k_rb[M], k_re[M], k_pos[M], k_ok[M], q_rb[C], q_re[C], q_pos[C];
  __shared__ float q_lse[C], q_delta[C];

  const int S = p.offsets[p.batch];
  const int j0 = blockIdx.x * M, h0 = blockIdx.y * Tr::kBlockN;
  if (j0 >= S || (kDv && h0 >= p.h)) return;
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int nkeys = min(M, S - j0);
  const int W = p.window;
  const bool softmax = p.activation == kSoftmax;

  if (tid < M) {
    const int j = j0 + tid;
    int rb = 0, re = 0, pos = 0, ok = 0;
    if (tid < nkeys) {
      const int b = find_row(p.offsets, p.batch, j);
      rb = p.offsets[b];
      re = p.offsets[b + 1];
      pos = p.positions ? p.positions[j] : 0;
      ok = !p.key_valid || p.key_valid[j] ? 1 : 0;
    }
    k_rb[tid] = rb;
    k_re[tid] = re;
    k_pos[tid] = pos;
    k_ok[tid] = ok;
  }
  __syncthreads();
  const int i_begin = p.causal ? j0 : max(k_rb[0], j0 - W);
  const int i_end = min(k_re[nkeys - 1], j0 + nkeys + W);

  float acc[4][4 * NS];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4 * NS; ++j) acc[i][j] = 0.f;

  for (int qc = i_begin; qc < i_end; qc += C) {
    const int nqc = min(C, i_end - qc);
    __syncthreads();
    if (tid < C) {
      const int i = qc + tid;
      int rb = 0, re = 0, pos = 0;
      float lse = 0.f, delta = 0.f;
      if (tid < nqc) {
        const int b = find_row(p.offsets, p.batch, i);
        rb = p.offsets[b];
        re = p.offsets[b + 1];
        pos = p.positions ? p.positions[i] : 0;
        if (softmax) {
          lse = p.lse[i];
          delta = p.delta[i];
        }
      }
      q_rb[tid] = rb;
      q_re[tid] = re;
      q_pos[tid] = pos;
      q_lse[tid] = lse;
      q_delta[tid] = delta;
    }
    // st[i][j]: key 4tm+i, query 4tn+j.
    float st[4][4];
    tile_dot<Tr>(st, stage, p.k, j0, nkeys, 1.f, p.q, qc, nqc, p.scale, p.z, p.vec_z, tm, tn);
    const WeightDropout drop(p);  // per chunk, as in the dq kernel
    float g[4][4];
    if (kDv) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * tm + i, kj = j0 + c;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int r = 4 * tn + j, qi = qc + r;
          const bool vis = c < nkeys && r < nqc && k_ok[c] && in_window(p, qi, q_rb[r], q_re[r], kj);
          g[i][j] = vis ? pair_weight(p.activation, st[i][j] + bias_value(p, qi, kj, q_pos[r], k_pos[c]), q_lse[r])
                        : 0.f;
          if constexpr (kDropout) g[i][j] *= drop(qi, kj);  // dv = (m A)^T dout
        }
      }
    } else {
      float dat[4][4];
      tile_dot<Tr>(dat, stage, p.v, j0, nkeys, 1.f, p.dout, qc, nqc, 1.f, p.h, p.vec_h, tm, tn);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * tm + i, kj = j0 + c;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int r = 4 * tn + j, qi = qc + r;
          const bool vis = c < nkeys && r < nqc && k_ok[c] && in_window(p, qi, q_rb[r], q_re[r], kj);
          g[i][j] = vis ? score_grad(p.activation, st[i][j] + bias_value(p, qi, kj, q_pos[r], k_pos[c]),
                                     kDropout ? dat[i][j] * drop(qi, kj) : dat[i][j], q_lse[r], q_delta[r])
                        : 0.f;
        }
      }
    }
    store_transposed<Tr>(tile, g, tm, tn);  // tile[r * kLd + c]: query-major, the A operand over queries

    if constexpr (kDv)
      tile_stream<Tr, Tr::kBlockN>(acc, tile, stage, p.dout, p.h, qc, nqc, h0, 1.f, p.vec_h, tm, tn);
    else
      tile_stream<Tr, Tr::kMaxZ>(acc, tile, stage, p.q, p.z, qc, nqc, 0, p.scale, p.vec_z, tm, tn);
  }

  const int width = kDv ? p.h : p.z;
  float* dst = kDv ? p.dv : p.dk;
  const int col0 = kDv ? h0 : 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = 4 * tm + i;
    if (c >= nkeys) continue;
    const long long kj = j0 + c;
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = col0 + 64 * s + 4 * tn + j;
        if (col < width) dst[kj * width + col] = acc[i][4 * s + j];
      }
  }
}

/// dbias[e] += sum over CTAs b of partial[b, e], for the CTAs whose range holds e. One warp per entry: lane l adds
/// the CTAs l, l + 32, ... in order, then a fixed shuffle tree adds the lanes, so the order never depends on timing.
/// (One thread looping over every CTA for its entry was latency-bound: about 0.2 ms at 1,024 CTAs.)
__global__ void bias_reduce_kernel(const double* __restrict__ partial, const int* __restrict__ range, int n_ctas,
                                   int table_size, float* __restrict__ dbias) {
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  for (int e = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; e < table_size; e += warps) {
    double acc = 0.0;
    for (int b = lane; b < n_ctas; b += 32)
      if (e >= range[2 * b] && e < range[2 * b + 1]) acc += partial[static_cast<long long>(b) * table_size + e];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) dbias[e] += static_cast<float>(acc);
  }
}

/// Blocks of 256 threads (8 warps, one entry each) for bias_reduce_kernel.
inline int bias_reduce_blocks(int table_size) { return std::min((table_size + 7) / 8, 132 * 32); }

/// delta[i] = dout_i . out_i (softmax), one warp per row in a fixed order.
__global__ void row_delta_kernel(const float* __restrict__ dout, const float* __restrict__ out, int h,
                                 const int* __restrict__ offsets, int batch, float* __restrict__ delta) {
  const int S = offsets[batch];
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < S; i += warps) {
    float acc = 0.f;
    for (int c = lane; c < h; c += 32)
      acc = fmaf(dout[static_cast<long long>(i) * h + c], out[static_cast<long long>(i) * h + c], acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[i] = acc;
  }
}

}  // namespace sma::cuda::attn
