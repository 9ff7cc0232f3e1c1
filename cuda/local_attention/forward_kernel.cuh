// cuda/local_attention/forward_kernel.cuh: the fused forward. One CTA = 64 queries x kBlockN output columns; it
// walks the queries' visible key range in chunks of 64 keys: scores (q'k'^T, staged over Z) -> bias, mask and
// activation in registers (softmax: online max/sum, FlashAttention style) -> weights to shared memory -> out += P V
// (V streamed 16 rows at a time); attention dropout multiplies the weights by their mask before P V. Nothing larger
// than a 64 x 64 tile exists at any time.
#pragma once

#include "tile.cuh"

namespace sma::cuda::attn {

// kDropout: attention dropout on (a second instantiation, so that the kernel without it keeps its registers).
template <class Tr, bool kDropout = false>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksFwd) local_attention_forward_kernel(const LocalAttentionParams p) {
  constexpr int M = Tr::kBlockM, C = Tr::kChunk, NS = Tr::kNsH;
  __shared__ __align__(16) float stage[Tr::kStageFloats];
  __shared__ __align__(16) float pt[Tr::kTileFloats];  // weights, key-major: pt[c * kLd + r]
  __shared__ int q_rb[M], q_re[M], q_pos[M], k_pos[C], k_ok[C];

  const int S = p.offsets[p.batch];
  const int q0 = blockIdx.x * M, h0 = blockIdx.y * Tr::kBlockN;
  if (q0 >= S || h0 >= p.h) return;  // launched for the capacity bound; uniform over the CTA
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int nq = min(M, S - q0);
  const bool softmax = p.activation == kSoftmax;

  if (tid < M) {
    const int i = q0 + tid;
    int rb = 0, re = 0, pos = 0;
    if (tid < nq) {
      const int b = find_row(p.offsets, p.batch, i);
      rb = p.offsets[b];
      re = p.offsets[b + 1];
      pos = p.positions ? p.positions[i] : 0;
    }
    q_rb[tid] = rb;
    q_re[tid] = re;
    q_pos[tid] = pos;
  }
  __syncthreads();
  const int k_begin = max(q_rb[0], q0 - p.window);
  const int k_end = p.causal ? q0 + nq : min(q_re[nq - 1], q0 + nq + p.window);

  float acc[4][4 * NS];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4 * NS; ++j) acc[i][j] = 0.f;
  float m_run[4], l_run[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.f;
  }

  for (int kc = k_begin; kc < k_end; kc += C) {
    const int nk = min(C, k_end - kc);
    __syncthreads();  // the previous chunk is done with k_pos, k_ok and pt
    if (tid < C) {
      const int j = kc + tid;
      const bool in = tid < nk;
      k_pos[tid] = in && p.positions ? p.positions[j] : 0;
      k_ok[tid] = in && (!p.key_valid || p.key_valid[j]) ? 1 : 0;
    }
    float s[4][4];
    tile_dot<Tr>(s, stage, p.q, q0, nq, p.scale, p.k, kc, nk, 1.f, p.z, p.vec_z, tm, tn);

    float w[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * tm + i, qi = q0 + r;
      bool vis[4];
      float x[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * tn + j, kj = kc + c;
        vis[j] = r < nq && k_ok[c] && in_window(p, qi, q_rb[r], q_re[r], kj);
        x[j] = vis[j] ? s[i][j] + bias_value(p, qi, kj, q_pos[r], k_pos[c]) : 0.f;
      }
      if (softmax) {
        float cmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (vis[j]) cmax = fmaxf(cmax, x[j]);
        cmax = row_max16(cmax);
        const float m_new = fmaxf(m_run[i], cmax);
        const float alpha = m_new == -INFINITY ? 1.f : expf(m_run[i] - m_new);
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[i][j] = vis[j] ? expf(x[j] - m_new) : 0.f;
          rs += w[i][j];
        }
        rs = row_sum16(rs);
        l_run[i] = l_run[i] * alpha + rs;
        m_run[i] = m_new;
#pragma unroll
        for (int j = 0; j < 4 * NS; ++j) acc[i][j] *= alpha;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) w[i][j] = vis[j] ? activate(p.activation, x[j]) : 0.f;
      }
      if constexpr (kDropout) {  // after the softmax sums: out = sum_j m_ij a_ij v_j, statistics undropped
        const WeightDropout drop(p);
#pragma unroll
        for (int j = 0; j < 4; ++j) w[i][j] *= drop(qi, kc + 4 * tn + j);
      }
    }
    store_transposed<Tr>(pt, w, tm, tn);

    tile_stream<Tr, Tr::kBlockN>(acc, pt, stage, p.v, p.h, kc, nk, h0, 1.f, p.vec_h, tm, tn);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * tm + i;
    if (r >= nq) continue;
    const long long qi = q0 + r;
    const float f = softmax ? (l_run[i] > 0.f ? 1.f / l_run[i] : 0.f) : 1.f;
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = h0 + 64 * s + 4 * tn + j;
        if (col < p.h) p.out[qi * p.h + col] = acc[i][4 * s + j] * f;
      }
    if (softmax && p.row_stat && blockIdx.y == 0 && tn == 0)
      p.row_stat[qi] = l_run[i] > 0.f ? m_run[i] + logf(l_run[i]) : INFINITY;
  }
}

}  // namespace sma::cuda::attn
