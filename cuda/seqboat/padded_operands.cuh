// cuda/seqboat/padded_operands.cuh: SeqBoatLayerDevice's passes that write the bf16 attention's padded operands
// (sma/cuda/local_attention.hpp, PADDED OPERANDS) straight from the GAU's bf16 base: q, k, v in the forward and
// dout in the backward, so the attention makes no padded copies of its own. They round exactly as the fp32 passes
// followed by the attention's pad pass would (the same fp32 expressions, attn::rotate_pair_bf16_path for rotary).
// A header of its own so that tests/cuda/emulation/emulate_padded.cpp can run them on the host.
#pragma once

#include "../common/site_mask.cuh"
#include "../local_attention/rotary.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace sma::cuda {
namespace {

// One warp per row, lanes over column pairs, kPaddedRows rows per block and the grid striding over the rows: a block
// per row (as before) left most of the 51,200 blocks of the training step's passes with nothing to do past S and
// the others with a few hundred threads' work, and these passes ran at a quarter of the memory bandwidth.
constexpr int kPaddedThreads = 256;
constexpr int kPaddedRows = kPaddedThreads / 32;

/// Blocks for `rows` rows (at most; a device bound may stop the rows earlier).
inline unsigned padded_blocks(long long rows) {
  return static_cast<unsigned>(std::min<long long>(std::max<long long>((rows + kPaddedRows - 1) / kPaddedRows, 1),
                                                   2048));
}

/// Two adjacent bf16 values as floats: one 4-byte load when `vec` (the caller knows the pair is aligned).
__device__ inline float2 load_pair(const __nv_bfloat16* p, bool vec, bool two) {
  if (vec) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  return make_float2(__bfloat162float(p[0]), two ? __bfloat162float(p[1]) : 0.f);
}

__device__ inline float silu_f(float b) { return b / (1.f + expf(-b)); }

// r = silu(base[:, Z:Z+H] + bias) from the bf16 base (not stored on the bf16 path).
__device__ inline float r_of(const __nv_bfloat16* base16, const float* bias, long long row, int P, int Z, int c) {
  return silu_f(__bfloat162float(base16[row * P + Z + c]) + bias[Z + c]);
}

// The bf16 attention's padded operands (sma/cuda/local_attention.hpp, PADDED OPERANDS) written here directly: a
// value goes to row off + s of its (rows, width) buffer, as bf16 rounded to nearest, the same bits as the
// attention's own pad pass would make of the fp32 value. Column pairs (2j, 2j + 1); an odd width ends with a single.
__device__ inline void store_pair_bf16(__nv_bfloat16* dst, int width, int c, float x0, float x1, bool two) {
  if (two && width % 2 == 0) {
    *reinterpret_cast<__nv_bfloat162*>(dst + c) = __floats2bfloat162_rn(x0, x1);
  } else {
    dst[c] = __float2bfloat16_rn(x0);
    if (two) dst[c + 1] = __float2bfloat16_rn(x1);
  }
}

// gau_act on the bf16 path straight into the padded q, k (rotated by the slot's position for rotary, in the
// attention's arithmetic: attn::rotate_pair_bf16_path) and v, for rows < min(rows, *bound) (bound may be null);
// fp32 q, k, v are not written: the bf16 attention reads only these. Same fp32 arithmetic as gau_act_kernel and
// gau_act_bf16x2_kernel. Dynamic shared memory: Z/2 doubles (the rotary frequencies) when kRot.
template <bool kRot>
__global__ void __launch_bounds__(kPaddedThreads) gau_act_padded_kernel(
    long long rows, int Z, int H, const __nv_bfloat16* __restrict__ base, const float* __restrict__ bias,
    const float* __restrict__ gamma, const float* __restrict__ beta, const int* __restrict__ positions,
    double theta, long long off, __nv_bfloat16* __restrict__ qp, __nv_bfloat16* __restrict__ kp,
    __nv_bfloat16* __restrict__ vp, const int* __restrict__ bound, DropoutArgs hidden = {}) {
  const SiteMask vmask(hidden, DropoutSite::gau_v);  // the GAU's hidden dropout on v
  extern __shared__ double gau_inv[];
  if constexpr (kRot) attn::rotary_frequencies(gau_inv, Z, theta);
  const int P = Z + 2 * H, Zp = (Z + 1) / 2, Hp = (H + 1) / 2;
  const bool vec = Z % 2 == 0 && H % 2 == 0;  // then every pair of a row starts on 4 bytes (P is even)
  const int lane = threadIdx.x % 32;
  if (bound) rows = min(rows, static_cast<long long>(*bound));
  for (long long row = static_cast<long long>(blockIdx.x) * kPaddedRows + threadIdx.x / 32; row < rows;
       row += static_cast<long long>(gridDim.x) * kPaddedRows) {
    const __nv_bfloat16* br = base + row * P;
    const double pos = kRot ? static_cast<double>(positions[row]) : 0.0;
    for (int j = lane; j < Zp + Hp; j += 32) {  // the z and v columns (r is not needed)
      const bool zc = j < Zp;
      const int c = zc ? 2 * j : 2 * (j - Zp);  // column within q and k, or within v
      const int w = zc ? Z : H;
      const int b0 = zc ? c : Z + H + c;        // column within base
      const bool two = c + 1 < w;
      const float2 bb = load_pair(br + b0, vec, two);
      const float a[2] = {silu_f(bb.x + bias[b0]), two ? silu_f(bb.y + bias[b0 + 1]) : 0.f};
      if (zc) {
        float q0 = a[0] * gamma[c] + beta[c], k0 = a[0] * gamma[Z + c] + beta[Z + c];
        float q1 = 0.f, k1 = 0.f;
        if (two) {
          q1 = a[1] * gamma[c + 1] + beta[c + 1];
          k1 = a[1] * gamma[Z + c + 1] + beta[Z + c + 1];
        }
        if constexpr (kRot) {  // Z is even for rotary, so `two` holds
          attn::rotate_pair_bf16_path(q0, q1, pos * gau_inv[c / 2]);
          attn::rotate_pair_bf16_path(k0, k1, pos * gau_inv[c / 2]);
        }
        store_pair_bf16(qp + (off + row) * Z, Z, c, q0, q1, two);
        store_pair_bf16(kp + (off + row) * Z, Z, c, k0, k1, two);
      } else {
        store_pair_bf16(vp + (off + row) * H, H, c, a[0] * vmask(row * H + c), a[1] * vmask(row * H + c + 1), two);
      }
    }
  }
}

// datt = dhr * r (the attention's dout) on rows < min(rows, *bound) (bound may be null) straight into the padded
// bf16 dout, and in fp32 into datt when it is not null (the softmax backward's row deltas read the fp32 dout).
// Same fp32 arithmetic as mul_r_kernel and mul_r_x2_kernel.
__global__ void mul_r_padded_kernel(long long rows, int Z, int H, const __nv_bfloat16* __restrict__ a,
                                    const __nv_bfloat16* __restrict__ base16, const float* __restrict__ bias,
                                    const int* __restrict__ bound, float* __restrict__ datt, long long off,
                                    __nv_bfloat16* __restrict__ dop) {
  const long long live = bound ? min(rows, static_cast<long long>(*bound)) : rows;
  const int P = Z + 2 * H, Hp = (H + 1) / 2;
  const bool vec = Z % 2 == 0 && H % 2 == 0;
  const int lane = threadIdx.x % 32;
  for (long long row = static_cast<long long>(blockIdx.x) * kPaddedRows + threadIdx.x / 32; row < live;
       row += static_cast<long long>(gridDim.x) * kPaddedRows) {
    const long long o = row * H;
    for (int j = lane; j < Hp; j += 32) {
      const int c = 2 * j;
      const bool two = c + 1 < H;
      const float2 g = load_pair(a + o + c, vec, two), b = load_pair(base16 + row * P + Z + c, vec, two);
      const float x0 = g.x * silu_f(b.x + bias[Z + c]);
      const float x1 = two ? g.y * silu_f(b.y + bias[Z + c + 1]) : 0.f;
      if (datt) {
        if (two && H % 2 == 0) {
          *reinterpret_cast<float2*>(datt + o + c) = make_float2(x0, x1);
        } else {
          datt[o + c] = x0;
          if (two) datt[o + c + 1] = x1;
        }
      }
      store_pair_bf16(dop + (off + row) * H, H, c, x0, x1, two);
    }
  }
}

}  // namespace
}  // namespace sma::cuda
