// sma/cuda/local_attention.hpp: the working-memory local attention over compressed tokens on the device (fp32, or
// bf16 on tensor cores), forward and backward (the CUDA counterpart of sma/ops/local_attention.hpp; definitions in
// cuda/local_attention/).
// No CUDA header is included: tensors are plain device pointers, the stream an opaque `void*` (a cudaStream_t).
//
// WHAT (identical maths to sma::ops::local_attention_{forward,backward}; docs/maths/local_attention.md)
//   Row b of the packed batch owns slots [offsets[b], offsets[b+1]); S = offsets[B] is READ ON THE DEVICE. The
//   kernels are launched for `capacity` >= S rows (an upper bound, e.g. B*L straight after cuda::plan_compression),
//   so nothing waits for the host. Rows >= S of any tensor are neither read nor written (bf16: see below).
//     visible(i, j)  causal: i-W <= j <= i; bidirectional: |i-j| <= W; same row; key_valid[j] != 0 (if given)
//     s_ij = scale * rot(q_i) . rot(k_j) + bias_ij       (bias: none | simple (original positions) | local_simple)
//     a_ij = relu(s)^2 | softmax over visible j | laplace;  out_i = sum_j a_ij v_j
//   A softmax query with no visible key gets out_i = 0 and row_stat = +inf, as on the CPU.
//   fp32: nothing of size S x W is stored; scores are recomputed tile by tile (FlashAttention style).
// SHAPES (row-major float32, device memory, `capacity` rows allocated)
//   q, k (capacity, Z); v, out, dout (capacity, H); dq, dk (capacity, Z); dv (capacity, H);
//   offsets (B+1) int32; positions (capacity) int32, nondecreasing within each row (true for every compression
//   plan); key_valid (capacity) uint8 or nullptr; row_stat (capacity) float (softmax only);
//   bias_table / dbias_table: bias_table_size() floats (2P-1 simple, 6W-1 local_simple).
// LIMITS: fp32 kernels: Z <= 128 (any H). bf16 (cfg.bf16): any Z, H; every activation, position, direction.
//   Rotary: Z <= 8192 (a frequency table in shared memory).
// PRECISION (cfg.bf16 = true; cuda/local_attention/band_bf16.cuh): q', k', v (and dout) are rounded to bf16 once
//   (the rounding folded into the rotary pre-pass), products run on tensor cores (cuBLAS, bf16 in, fp32 accumulate);
//   scores, bias, masks, softmax statistics (max, sum, log-sum-exp, delta) and dS stay fp32, the attention weights
//   and dS are rounded to bf16 as operands of the second products, the bias gradient is summed from the fp32 dS in
//   double. Inputs and outputs at this API stay fp32 (a caller may instead hand over the padded bf16 operands
//   itself: PADDED OPERANDS below). Errors measured in the tests: a few 1e-3 of each tensor's largest magnitude
//   (8-bit mantissas), not fp32's 1e-6.
//   Differences of the bf16 path: rows [S, capacity) of out, dq, dk, dv are either set to ZERO or left untouched
//   (its products run in chunks of blocks of 64 slots, up to the chunk holding slot S - 1; row_stat rows >= S stay
//   untouched); its temporaries hold a band of capacity x (64 + 2 W') scores (W' = min(W, capacity) rounded up
//   to 64; one side only when causal): about 16 bytes per band entry in the backward, 6 in the forward. Its
//   products go through cuda::bounded_gemm (sma/cuda/bounded_gemm.hpp): CUDA graphs, cached per host thread, that
//   skip the chunks past S on the device, so its time follows S rounded up to 1/16 of `capacity`, without a host
//   wait. Those graphs and a cuBLAS handle per device and host thread live until the thread ends. It raises the
//   release threshold of the device's stream-ordered memory pool to its workspace size, so the pool keeps that
//   much memory across synchronisations instead of mapping it afresh for every call (which also keeps the
//   workspace addresses, hence the cached graphs, the same from call to call).
// GRADIENTS: backward ASSIGNS dq, dk, dv (rows < S) and ADDS into dbias_table, deterministically (the bias
//   gradient is reduced per tile in a fixed order, in double, then over tiles in a fixed order). The softmax
//   backward needs the forward's `out` and `row_stat`; relu2 and laplace need neither (pass nullptr).
// ERRORS: ValueError (bad configuration, Z > 128 in fp32, missing pointers, padded operands without cfg.bf16),
// CudaError (a failed CUDA or cuBLAS call).
#pragma once

#include <cstdint>

namespace sma::cuda {

/// Same order as sma::ops::AttentionActivation.
enum class Activation : int { relu2, softmax, laplace };
/// Same order as sma::ops::PositionEncoding.
enum class Position : int { none, simple, local_simple, rotary };

struct LocalAttentionConfig {
  int window = 0;                            ///< W >= 1, counted in compressed slots
  bool causal = true;                        ///< false: bidirectional
  Activation activation = Activation::relu2;
  Position position = Position::simple;
  int max_positions = 1024;                  ///< P of the simple table (2P-1 entries)
  double rotary_theta = 10000.0;
  /// false: the fp32 fused kernels (CUDA cores). true: bf16 operands on tensor cores, fp32 accumulation and fp32
  /// softmax statistics, fp32 inputs/outputs (PRECISION above). SeqBoatLayerDevice passes its `attention` config
  /// through, so setting this in SeqBoatDeviceConfig::attention switches the layer's attention.
  bool bf16 = false;
  /// Attention-weight dropout in [0, 1) (the reference's attention_dropout; training only: leave 0 for inference).
  /// The mask is the CPU op's (sma::ops::LocalAttentionConfig::dropout, ops::detail::DropoutMask), a function of
  /// (seed, query slot i, key slot j): the weight a_ij is dropped when mix64(mix64(seed) ^ mix64(i 0x9e3779b97f4a7c15
  /// + j)) >> 11 < dropout 2^53 and scaled by 1 / (1 - dropout) otherwise, so the backward recomputes it and the
  /// same seed gives the CPU op's mask bit for bit. seed = dropout_seed, or, when dropout_draw (device memory) is
  /// given, dropout_key(dropout_seed, *dropout_draw, DropoutSite::attention) (sma/cuda/dropout.hpp): read on the
  /// device, so a CUDA graph of a training step draws a fresh mask at every replay.
  double dropout = 0.0;
  std::uint64_t dropout_seed = 0;
  const std::uint64_t* dropout_draw = nullptr;

  /// 2P-1 (simple), 6W-1 (local_simple), else 0.
  int bias_table_size() const {
    if (position == Position::simple) return 2 * max_positions - 1;
    if (position == Position::local_simple) return 6 * window - 1;
    return 0;
  }
};

/// The packed inputs (device pointers). `capacity` is the number of rows the arrays hold and the launch bound.
struct LocalAttentionInputs {
  int batch = 0;                             ///< B: offsets has B+1 entries
  int capacity = 0;                          ///< >= S = offsets[B]
  int z = 0, h = 0;                          ///< widths of q/k and v
  const int* offsets = nullptr;              ///< (B+1)
  const int* positions = nullptr;            ///< (capacity); required for simple and rotary
  const std::uint8_t* key_valid = nullptr;   ///< (capacity) or nullptr = every key valid
  const float* q = nullptr;                  ///< (capacity, Z)
  const float* k = nullptr;                  ///< (capacity, Z)
  const float* v = nullptr;                  ///< (capacity, H)
  /// Optional caller-written padded bf16 operands of the bf16 path (cfg.bf16 only; PADDED OPERANDS below). Each one
  /// given replaces the attention's own padded copy of that operand, and the fp32 array beside it may then be
  /// nullptr (dout: unless softmax, whose row deltas read the fp32 dout).
  void* q_padded = nullptr;                  ///< (rows, Z) bf16
  void* k_padded = nullptr;                  ///< (rows, Z) bf16
  void* v_padded = nullptr;                  ///< (rows, H) bf16
  void* dout_padded = nullptr;               ///< (rows, H) bf16, read by the backward only
};

// PADDED OPERANDS (cfg.bf16). The bf16 path multiplies padded bf16 copies of q', k' (rotated for rotary), v and
// dout: `rows` rows (local_attention_padded_layout), row `offset` + s holding slot s. By default it writes them
// itself from the fp32 arrays, in the forward and again in the backward. A caller that produces these tensors can
// write them straight into persistent buffers instead (LocalAttentionInputs::*_padded), which saves those passes.
// Contract, per buffer (rows x width bf16, rows contiguous, width Z for q and k, H for v and dout):
//   - the caller fills rows [offset, offset + S) before the call, on the call's stream: slot s in row offset + s,
//     bf16 round-to-nearest of the fp32 value, q and k rotated first for rotary in the attention's own arithmetic
//     (cuda/local_attention/rotary.cuh: angle = double(position) * 1 / theta^(2m/Z) in double,
//     rotate_pair_bf16_path), so that the result is bitwise the attention's;
//   - rows [0, offset) stay zero (zero the buffer once when allocating it: nothing else writes there);
//   - the attention zeroes, in each call, the rows from offset + S on that its products read (stale rows of an
//     earlier, larger S included); rows further on are never read. The buffers are otherwise left as they are, so
//     one filling serves a forward and its backward.
// local_attention_pad_bf16 fills a buffer from an fp32 array exactly as the attention would (for callers with fp32
// operands that want to pad once for a forward and its backward).
struct PaddedLayout {
  long long rows = 0;  ///< rows of each padded buffer
  int offset = 0;      ///< W' (the window rounded up to 64 slots): row of slot 0
};

/// The padded layout of the bf16 path for a configuration and a capacity (0 rows for capacity 0).
PaddedLayout local_attention_padded_layout(const LocalAttentionConfig& cfg, int capacity);

enum class PaddedOperand : int { q, k, v, dout };

/// dst (a padded buffer of `which`, local_attention_padded_layout rows) from src (capacity, width) fp32, as the
/// attention pads it: rows [offset, offset + S) the bf16 slots (q, k rotated for rotary), rows [0, offset) and the
/// rows past S that the products read zero. in.offsets (and positions for rotary) are read; q, k, v are not.
void local_attention_pad_bf16(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, PaddedOperand which,
                              const float* src, void* dst, void* stream = nullptr);

/// out (capacity, H) rows < S; row_stat (softmax: the log-sum-exp of each query, +inf without a visible key; may be
/// nullptr when no backward follows; ignored for relu2/laplace).
void local_attention_forward(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, const float* bias_table,
                             float* out, float* row_stat, void* stream = nullptr);

/// dq, dk (capacity, Z), dv (capacity, H): assigned for rows < S. dout may be nullptr when in.dout_padded is given
/// and the activation is not softmax. dbias_table: ADDED into (required when the
/// configuration has a table). `out` and `row_stat` are the forward's (softmax only; nullptr otherwise).
/// Temporary device memory (rotated copies for rotary, per-tile bias partials) is taken with cudaMallocAsync on
/// `stream` and given back before returning.
void local_attention_backward(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                              const float* bias_table, const float* out, const float* row_stat, const float* dout,
                              float* dq, float* dk, float* dv, float* dbias_table, void* stream = nullptr);

}  // namespace sma::cuda
