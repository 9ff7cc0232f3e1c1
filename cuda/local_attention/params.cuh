// cuda/local_attention/params.cuh: the POD parameter blocks shared by the launchers (host) and the kernels (device).
// Flags are ints (not bools or enums) so the layout is the same whichever compiler reads it.
#pragma once

#include <cstdint>

namespace sma::cuda::attn {

enum : int { kRelu2 = 0, kSoftmax = 1, kLaplace = 2 };             // sma::cuda::Activation
enum : int { kPosNone = 0, kPosSimple = 1, kPosLocal = 2, kPosRotary = 3 };  // sma::cuda::Position

struct LocalAttentionParams {
  int batch, capacity, z, h;
  int window, causal, activation, position, max_positions, table_size;
  float scale;                       // 1/W, 1/(2W) or Z^-1/2, applied to q when it is staged
  int vec_z, vec_h;                  // rows of q/k (resp. v/dout) may be read as float4
  const int* offsets;                // (B+1)
  const int* positions;              // (capacity) or nullptr
  const std::uint8_t* key_valid;     // (capacity) or nullptr
  const float* q;                    // (capacity, Z): rotated copy for rotary
  const float* k;                    // (capacity, Z): rotated copy for rotary
  const float* v;                    // (capacity, H)
  const float* bias_table;           // table_size or nullptr
  float* out;                        // (capacity, H)
  float* row_stat;                   // (capacity) softmax log-sum-exp, or nullptr
  // Attention dropout (LocalAttentionConfig::dropout; WeightDropout in tile.cuh): off when drop_threshold is 0.
  std::uint64_t drop_seed;           // the config's dropout_seed
  const std::uint64_t* drop_draw;    // the config's dropout_draw, or nullptr
  std::uint64_t drop_threshold;      // p 2^53
  float drop_keep;                   // 1 / (1 - p)
};

struct LocalAttentionBackwardParams : LocalAttentionParams {
  const float* dout;                 // (capacity, H)
  const float* lse;                  // (capacity) softmax: the forward's row_stat
  const float* delta;                // (capacity) softmax: dout_i . out_i
  float* dq;                         // (capacity, Z)
  float* dk;                         // (capacity, Z)
  float* dv;                         // (capacity, H)
  double* dbias_partial;             // (blocks of 64 queries, table_size): per-block bias gradient partials
  int* dbias_range;                  // (2 * blocks): the entries [lo, hi) each block wrote
  float* dsband;                     // fp32 path with a table: dS as a band (BandGeometry: row i, column j - i/64*64
                                     // + band_wpad, band_width columns), for band_dbias_kernel
  int band_wpad, band_width;
};

}  // namespace sma::cuda::attn
