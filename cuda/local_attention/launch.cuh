// cuda/local_attention/launch.cuh: host-side checks, parameter blocks, stream-ordered workspace and the rotary
// kernel shared by the forward and backward launchers.
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/local_attention.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"
#include "kernel_traits.cuh"
#include "params.cuh"
#include "rotary.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sma::cuda::attn {

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::relu2: return "relu2";
    case Activation::softmax: return "softmax";
    case Activation::laplace: return "laplace";
  }
  return "?";
}

inline const char* position_name(Position p) {
  switch (p) {
    case Position::none: return "none";
    case Position::simple: return "simple";
    case Position::local_simple: return "local_simple";
    case Position::rotary: return "rotary";
  }
  return "?";
}

/// The rotary kernels keep a table of Z/2 frequencies (doubles) in shared memory: wider rotary Z is refused.
constexpr int kMaxRotaryZ = 8192;

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

/// Throws ValueError naming the first problem of the configuration or the inputs.
inline void validate(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, const float* bias_table,
                     const char* where) {
  const int a = static_cast<int>(cfg.activation), ps = static_cast<int>(cfg.position);
  if (a < 0 || a > 2) throw ValueError(str_cat(where, ": unknown activation ", a));
  if (ps < 0 || ps > 3) throw ValueError(str_cat(where, ": unknown position encoding ", ps));
  if (!(cfg.dropout >= 0 && cfg.dropout < 1))
    throw ValueError(str_cat(where, ": dropout must be in [0, 1), got ", cfg.dropout));
  if (cfg.window < 1) throw ValueError(str_cat(where, ": window must be >= 1, got ", cfg.window));
  if (cfg.position == Position::simple && cfg.max_positions < 1)
    throw ValueError(str_cat(where, ": max_positions must be >= 1 for simple positions, got ", cfg.max_positions));
  if (cfg.position == Position::rotary && !(cfg.rotary_theta > 0))
    throw ValueError(str_cat(where, ": rotary_theta must be > 0, got ", cfg.rotary_theta));
  if (in.batch < 0) throw ValueError(str_cat(where, ": batch must be >= 0, got ", in.batch));
  if (in.capacity < 0) throw ValueError(str_cat(where, ": capacity must be >= 0, got ", in.capacity));
  if (in.z < 1 || in.h < 1)
    throw ValueError(str_cat(where, ": widths must be >= 1, got Z = ", in.z, ", H = ", in.h));
  if (!cfg.bf16 && in.z > DefaultTraits::kMaxZ)
    throw ValueError(str_cat(where, ": Z = ", in.z, " is not supported on the device yet (at most ",
                             DefaultTraits::kMaxZ, ")"));
  if (cfg.position == Position::rotary && in.z > kMaxRotaryZ)
    throw ValueError(str_cat(where, ": rotary positions support Z <= ", kMaxRotaryZ, ", got ", in.z));
  if (cfg.position == Position::rotary && in.z % 2 != 0)
    throw ValueError(str_cat(where, ": rotary positions need an even width Z, got ", in.z));
  if (!in.offsets) throw ValueError(str_cat(where, ": offsets is nullptr (expected B+1 device ints)"));
  const bool padded = in.q_padded || in.k_padded || in.v_padded || in.dout_padded;
  if (padded && !cfg.bf16)
    throw ValueError(
        str_cat(where, ": padded bf16 operands (q_padded, k_padded, v_padded, dout_padded) need cfg.bf16"));
  for (const void* b : {in.q_padded, in.k_padded, in.v_padded, in.dout_padded})
    if (b && !aligned16(b))
      throw ValueError(str_cat(where, ": padded bf16 operands must be 16-byte aligned (as cudaMalloc's)"));
  if (in.capacity > 0 && ((!in.q && !in.q_padded) || (!in.k && !in.k_padded) || (!in.v && !in.v_padded)))
    throw ValueError(str_cat(where, ": q, k or v is nullptr (and no padded bf16 copy of it is given)"));
  if ((cfg.position == Position::simple || cfg.position == Position::rotary) && in.capacity > 0 && !in.positions)
    throw ValueError(str_cat(where, ": positions is nullptr but ", position_name(cfg.position), " positions need them"));
  if (cfg.bias_table_size() > 0 && !bias_table)
    throw ValueError(str_cat(where, ": bias_table is nullptr but ", position_name(cfg.position), " positions need ",
                             cfg.bias_table_size(), " entries"));
}

inline LocalAttentionParams make_params(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                                        const float* bias_table) {
  LocalAttentionParams p{};
  p.batch = in.batch;
  p.capacity = in.capacity;
  p.z = in.z;
  p.h = in.h;
  p.window = cfg.window;
  p.causal = cfg.causal ? 1 : 0;
  p.activation = static_cast<int>(cfg.activation);
  p.position = static_cast<int>(cfg.position);
  p.max_positions = cfg.max_positions;
  p.table_size = cfg.bias_table_size();
  p.scale = static_cast<float>(cfg.activation == Activation::softmax ? 1.0 / std::sqrt(static_cast<double>(in.z))
                                                                     : 1.0 / (cfg.causal ? cfg.window : 2.0 * cfg.window));
  p.vec_z = in.z % 4 == 0 && aligned16(in.q) && aligned16(in.k);
  p.vec_h = in.h % 4 == 0 && aligned16(in.v);
  p.offsets = in.offsets;
  p.positions = in.positions;
  p.key_valid = in.key_valid;
  p.q = in.q;
  p.k = in.k;
  p.v = in.v;
  p.bias_table = p.table_size > 0 ? bias_table : nullptr;
  if (cfg.dropout > 0) {
    p.drop_seed = cfg.dropout_seed;
    p.drop_draw = cfg.dropout_draw;
    // As ops::detail::DropoutMask: p 2^53 truncated; a rate too small to give 1 drops nothing, as on the CPU.
    p.drop_threshold = static_cast<std::uint64_t>(cfg.dropout * 9007199254740992.0);
    p.drop_keep = static_cast<float>(1.0 / (1.0 - cfg.dropout));
  }
  return p;
}

/// Temporary device memory on the caller's stream (cuda/common/workspace.cuh).
using AsyncWorkspace = detail::StreamWorkspace;

namespace {

// dst row s = R(sign * positions[s]) src row s for s < S (dst may be src). One warp per row; dynamic shared
// memory: z/2 doubles (the frequencies).
template <bool kPrecise>
__global__ void rotary_kernel(const float* src, float* dst, int z, const int* __restrict__ offsets, int batch,
                              const int* __restrict__ positions, double theta, double sign) {
  extern __shared__ double rotary_inv[];
  rotary_frequencies(rotary_inv, z, theta);
  const int S = offsets[batch];
  const int lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  for (int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; s < S; s += warps) {
    const double pos = sign * static_cast<double>(positions[s]);
    const long long o = static_cast<long long>(s) * z;
    for (int m = lane; m < z / 2; m += 32) {
      double sn, cs;
      rotary_angle<kPrecise>(pos * rotary_inv[m], cs, sn);
      const double x0 = src[o + 2 * m], x1 = src[o + 2 * m + 1];
      dst[o + 2 * m] = static_cast<float>(x0 * cs - x1 * sn);
      dst[o + 2 * m + 1] = static_cast<float>(x0 * sn + x1 * cs);
    }
  }
}

}  // namespace

inline void launch_rotary(const float* src, float* dst, const LocalAttentionInputs& in, double theta, double sign,
                          cudaStream_t s, bool precise = true) {
  const int blocks = static_cast<int>(std::min<long long>(std::max<long long>((in.capacity + 7) / 8, 1), 132LL * 16));
  const std::size_t smem = static_cast<std::size_t>(in.z / 2) * sizeof(double);
  if (precise)
    rotary_kernel<true><<<blocks, 256, smem, s>>>(src, dst, in.z, in.offsets, in.batch, in.positions, theta, sign);
  else
    rotary_kernel<false><<<blocks, 256, smem, s>>>(src, dst, in.z, in.offsets, in.batch, in.positions, theta, sign);
  SMA_CUDA_CHECK_LAUNCH();
}

/// Rotary only: rotated copies of q and k from `ws`, and p's q/k pointed at them (forward and backward start so).
inline void rotate_qk(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, LocalAttentionParams& p,
                      AsyncWorkspace& ws, cudaStream_t s) {
  if (cfg.position != Position::rotary) return;
  float* qr = ws.alloc<float>(static_cast<long long>(in.capacity) * in.z);
  float* kr = ws.alloc<float>(static_cast<long long>(in.capacity) * in.z);
  launch_rotary(in.q, qr, in, cfg.rotary_theta, 1.0, s);
  launch_rotary(in.k, kr, in, cfg.rotary_theta, 1.0, s);
  p.q = qr;
  p.k = kr;
  p.vec_z = in.z % 4 == 0;
}

inline int row_blocks(int capacity) { return (capacity + DefaultTraits::kBlockM - 1) / DefaultTraits::kBlockM; }
inline int col_blocks(int h) { return (h + DefaultTraits::kBlockN - 1) / DefaultTraits::kBlockN; }

}  // namespace sma::cuda::attn
