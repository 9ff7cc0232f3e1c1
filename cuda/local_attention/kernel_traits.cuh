// cuda/local_attention/kernel_traits.cuh: tile sizes of the fused local-attention kernels, checked at compile time.
//
// Every kernel is a band of 64-row tiles: a CTA owns kBlockM rows of one side (queries for the forward and dq, keys
// for dk and dv) and walks the other side's visible range in chunks of kChunk rows. Each product is computed by
// 256 threads laid out 16 x 16, each owning a 4 x 4 micro-tile per 64 output columns (tile_mma in tile.cuh), from
// shared-memory operands stored reduction-major. Reductions over Z or H are staged kStageK columns at a time;
// products whose reduction runs over the chunk (P.V, dS.K, ...) stream the B operand kSubRows rows at a time
// through the same staging area. Wide outputs (H) are split over gridDim.y in kBlockN columns.
#pragma once

namespace sma::cuda::attn {

template <int kBlockM_ = 64, int kChunk_ = 64, int kStageK_ = 32, int kBlockN_ = 256, int kSubRows_ = 16,
          int kMaxZ_ = 128, int kMinBlocksFwd_ = 1, int kMinBlocksBwd_ = 2>
struct LocalAttentionTraits {
  static constexpr int kBlockM = kBlockM_;    // rows owned by a CTA
  static constexpr int kChunk = kChunk_;      // rows of the other side per step
  static constexpr int kStageK = kStageK_;    // reduction columns staged per step (Z or H)
  static constexpr int kBlockN = kBlockN_;    // output columns of H per CTA (forward out, dv)
  static constexpr int kSubRows = kSubRows_;  // rows of the streamed B operand per step
  static constexpr int kMaxZ = kMaxZ_;        // widest Z: dq/dk keep a kBlockM x kMaxZ accumulator in registers
  static constexpr int kThreads = (kBlockM / 4) * (kChunk / 4);
  static constexpr int kLd = kBlockM + 4;     // leading dimension of 64-wide reduction-major tiles (16 B aligned)
  static constexpr int kLdH = kBlockN + 4;    // streamed V / dout rows
  static constexpr int kLdZ = kMaxZ + 4;      // streamed K / Q rows
  static constexpr int kStageFloats = 2 * kStageK * kLd;
  static constexpr int kTileFloats = kChunk * kLd;
  static constexpr int kNsH = kBlockN / 64;   // 64-column sub-tiles per thread row in the H products
  static constexpr int kNsZ = kMaxZ / 64;     // ... in the Z products
  // CTAs per SM the register allocation aims at (__launch_bounds__). Measured on an H200 at the issue's shape
  // (docs/cuda.md, "Tuning"): the forward is faster with all 255 registers and one CTA per SM, the backward
  // kernels with two CTAs per SM (128 registers each).
  static constexpr int kMinBlocksFwd = kMinBlocksFwd_;
  static constexpr int kMinBlocksBwd = kMinBlocksBwd_;

  static_assert(kBlockM == 64 && kChunk == 64,
                "tile_mma lays 256 threads out as 16 x 16 with 4 x 4 micro-tiles: kBlockM and kChunk must be 64");
  static_assert(kThreads == 256, "the kernels are written for 256 threads (8 warps)");
  static_assert(kStageK % 4 == 0 && (kBlockM * kStageK / 4) % kThreads == 0,
                "staging loads float4 columns: kStageK must be a multiple of 4 dividing the thread count evenly");
  static_assert(kBlockN % 64 == 0 && kMaxZ % 64 == 0, "output widths are covered by 64-column sub-tiles");
  static_assert(kChunk % kSubRows == 0, "the streamed B operand advances kSubRows rows of a chunk at a time");
  static_assert(kSubRows * kLdH <= kStageFloats && kSubRows * kLdZ <= kStageFloats,
                "a streamed sub-chunk of V/dout (or K/Q) must fit in the staging area it reuses");
  static_assert((kLd % 4) == 0 && (kLdH % 4) == 0 && (kLdZ % 4) == 0, "float4 shared-memory rows need 16 B alignment");
  static_assert((kStageFloats + kTileFloats) * 4 + 16 * 64 * 4 <= 48 * 1024,
                "static shared memory of one CTA must stay under 48 KiB");
};

using DefaultTraits = LocalAttentionTraits<>;

}  // namespace sma::cuda::attn
