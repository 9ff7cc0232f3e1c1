// sma/ops/local_attention.hpp: SeqBoat's working-memory local attention over compressed (routed) tokens, forward
// and backward, as an op on plain matrices (no Param objects; the GAU layer owns the parameters).
//
// WHAT (ARCHITECTURE.md §1 steps 7-8; the reference's SeqBoatLayer.local_attention and element_attention)
//   A batch of B ragged compressed sequences is packed row after row: sequence b occupies the slots
//   [offsets[b], offsets[b+1]) of q, k and v. Within one sequence, with slot indices i (query) and j (key):
//     visible(i, j)  causal:        i - W <= j <= i          and key_valid[j] != 0
//                    bidirectional: |i - j| <= W             and key_valid[j] != 0
//     q'_i = scale * rot(q_i),  k'_j = rot(k_j)               rot = identity unless position == rotary
//     s_ij = q'_i . k'_j + bias_ij
//     a_ij = relu(s_ij)^2                                       relu2   (scale 1/W causal, 1/(2W) bidirectional)
//          = exp(s_ij) / sum_{visible j'} exp(s_ij')            softmax (scale Z^-1/2)
//          = 0.5 * (1 + erf((s_ij - mu) / (sigma sqrt 2)))      laplace (MEGA; mu = sqrt(1/2), sigma = sqrt(1/4pi);
//                                                                         scale as relu2)
//          and a_ij = 0 exactly where (i, j) is not visible
//     out_i = sum_j m_ij a_ij v_j                                  m_ij = 1 unless attention dropout is on:
//                                                                  then 0 with probability p, else 1/(1-p)
//   bias_ij: none -> 0; simple -> table[clamp(P-1 + pos_j - pos_i, 0, 2P-2)] with ORIGINAL positions pos;
//            local_simple -> table[4W-1 + j - i] (slot indices); rotary -> 0 (the rotation carries position).
//   A softmax query with no visible key (possible only for rows the caller discards) gets out_i = 0; the
//   reference would average uniformly over its look-around window instead (it masks with -5e4, not -inf). For
//   every query with at least one visible key the result equals the reference's in float64.
//
// SHAPES
//   q, k (S, Z); v (S, H); out (S, H); S = offsets.back(); positions, key_valid: S entries.
//   bias table: LocalAttentionConfig::bias_table_size() entries (2P-1, 6W-1, or 0).
//
// GRADIENTS (local_attention_backward)
//   ASSIGNS dq (S, Z), dk (S, Z), dv (S, H); ADDS the table gradient into dbias_table (required when the
//   configuration has a table). The result does not depend on the number of threads (see "Determinism" in
//   docs/maths/local_attention.md).
//
// DROPOUT (the reference's attention_dropout, applied to the weights after the activation)
//   m_ij is a pure function of (dropout_seed, i, j) (a counter-based hash of the packed slot indices), so the
//   backward recomputes the mask instead of storing S x W bits, and the result does not depend on the threads.
//
// COST
//   Work O(S * W * (Z + H)); memory O(S * (Z + H)): nothing of size S x W is ever stored. The forward saves one
//   number per query (softmax: the log-sum-exp); the backward recomputes the scores block by block.
//   Queries are processed in blocks of up to 64 rows: a block's visible keys form one contiguous slot range, so
//   its scores are one GEMM (nq x Z) * (Z x nk) and its output one GEMM (nq x nk) * (nk x H); the bias is computed
//   on the fly from the positions. Derivations: docs/maths/local_attention.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>
#include <sma/core/tensor.hpp>
#include <sma/ops/rel_pos.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sma::ops {

/// How scores become attention weights (the reference's `attention_activation`; laplace is MEGA's).
enum class AttentionActivation { relu2, softmax, laplace };

/// How the relative position enters the scores.
enum class PositionEncoding { none, simple, local_simple, rotary };

inline const char* to_string(AttentionActivation a) {
  switch (a) {
    case AttentionActivation::relu2: return "relu2";
    case AttentionActivation::softmax: return "softmax";
    case AttentionActivation::laplace: return "laplace";
  }
  return "?";
}

inline const char* to_string(PositionEncoding p) {
  switch (p) {
    case PositionEncoding::none: return "none";
    case PositionEncoding::simple: return "simple";
    case PositionEncoding::local_simple: return "local_simple";
    case PositionEncoding::rotary: return "rotary";
  }
  return "?";
}

/// "relu2", "softmax" or "laplace"; anything else throws ValueError naming the string.
inline AttentionActivation parse_attention_activation(const std::string& s) {
  if (s == "relu2") return AttentionActivation::relu2;
  if (s == "softmax") return AttentionActivation::softmax;
  if (s == "laplace") return AttentionActivation::laplace;
  throw ValueError(str_cat("unknown attention activation '", s, "' (expected relu2, softmax or laplace)"));
}

/// "none", "simple", "local_simple" or "rotary"; anything else throws ValueError naming the string.
inline PositionEncoding parse_position_encoding(const std::string& s) {
  if (s == "none") return PositionEncoding::none;
  if (s == "simple") return PositionEncoding::simple;
  if (s == "local_simple") return PositionEncoding::local_simple;
  if (s == "rotary") return PositionEncoding::rotary;
  throw ValueError(str_cat("unknown position encoding '", s, "' (expected none, simple, local_simple or rotary)"));
}

/// Configuration of the op. `window` (W, counted in compressed slots) must be set (>= 1).
struct LocalAttentionConfig {
  Index window = 0;                                     ///< W >= 1: keys at most W slots away are visible
  Direction direction = Direction::causal;              ///< causal: j in [i-W, i]; bidirectional: |i-j| <= W
  AttentionActivation activation = AttentionActivation::relu2;
  PositionEncoding position = PositionEncoding::simple;
  Index max_positions = 1024;                           ///< P: the simple table has 2P-1 entries
  double rotary_theta = 10000.0;
  int threads = 0;                                      ///< OpenMP threads (0 = OpenMP's default)
  Index query_block = 0;                                ///< queries per block (0 = automatic, <= 64)
  double dropout = 0.0;                                 ///< p in [0, 1): attention-weight dropout (training only)
  std::uint64_t dropout_seed = 0;                       ///< the mask is a function of (seed, i, j): same in backward

  /// Entries of the bias table this configuration reads: 2P-1 (simple), 6W-1 (local_simple), else 0.
  Index bias_table_size() const {
    if (position == PositionEncoding::simple) return 2 * max_positions - 1;
    if (position == PositionEncoding::local_simple) return 6 * window - 1;
    return 0;
  }

  /// The factor applied to queries: Z^-1/2 (softmax), 1/W (causal) or 1/(2W) (bidirectional) otherwise.
  double query_scale(Index z) const {
    if (activation == AttentionActivation::softmax) return 1.0 / std::sqrt(static_cast<double>(z));
    return 1.0 / static_cast<double>(direction == Direction::causal ? window : 2 * window);
  }

  /// Throws ValueError naming the bad value.
  void validate(const char* where = "LocalAttentionConfig") const {
    if (window < 1) throw ValueError(str_cat(where, ": window must be >= 1, got ", window));
    if (position == PositionEncoding::simple && max_positions < 1)
      throw ValueError(str_cat(where, ": max_positions must be >= 1 for simple positions, got ", max_positions));
    if (position == PositionEncoding::rotary && !(rotary_theta > 0))
      throw ValueError(str_cat(where, ": rotary_theta must be > 0, got ", rotary_theta));
    if (threads < 0) throw ValueError(str_cat(where, ": threads must be >= 0, got ", threads));
    if (query_block < 0) throw ValueError(str_cat(where, ": query_block must be >= 0, got ", query_block));
    if (!(dropout >= 0 && dropout < 1)) throw ValueError(str_cat(where, ": dropout must be in [0, 1), got ", dropout));
  }
};

/// A batch of ragged compressed sequences, packed: row b occupies slots [offsets[b], offsets[b+1]) of q, k, v.
/// Aggregate: `LocalAttentionInput<T>{q, k, v, &offsets, &positions, &key_valid}`.
template <class T>
struct LocalAttentionInput {
  CMatrixMap<T> q;                                      ///< (S, Z) queries before scaling/rotation
  CMatrixMap<T> k;                                      ///< (S, Z)
  CMatrixMap<T> v;                                      ///< (S, H)
  const std::vector<Index>* offsets = nullptr;          ///< B+1 entries, offsets[0] = 0, nondecreasing, back() = S
  const std::vector<std::int64_t>* positions = nullptr; ///< S original 0-based positions (simple, rotary)
  const std::vector<std::uint8_t>* key_valid = nullptr; ///< nullptr = all valid; else S entries, 0 = masked key
};

/// What the backward needs from the forward: softmax stores each query's log-sum-exp (+inf for a query with no
/// visible key); relu2 and laplace store nothing (size 0). An empty row_stat with softmax makes the backward
/// recompute the log-sum-exp.
template <class T>
struct LocalAttentionSaved {
  Vector<T> row_stat;
};

/// out (S, H). `bias_table` must hold bias_table_size() entries when that is > 0 (ignored otherwise). `saved` may
/// be nullptr (inference).
template <class T>
Matrix<T> local_attention_forward(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                  const T* bias_table, LocalAttentionSaved<T>* saved);

/// As local_attention_forward, into `out` (S, H) (no allocation of the output).
template <class T>
void local_attention_forward_into(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                  const T* bias_table, LocalAttentionSaved<T>* saved, MatrixMap<T> out);

/// The forward with its last product left to the caller, to fuse what follows the attention: for every block of
/// queries q0..q0+nq-1, `sink(q0, nq, k0, nk, a)` is called with `a` (nq, nk) the block's attention weights against
/// the keys k0..k0+nk-1 (zero where not visible), so that out[q0:q0+nq] = a * v[k0:k0+nk]. Calls come from several
/// OpenMP threads at once (blocks never overlap), with Eigen single-threaded inside.
template <class T, class Sink>
void local_attention_forward_blocks(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                    const T* bias_table, LocalAttentionSaved<T>* saved, Sink&& sink);

/// Assigns dq, dk (S, Z) and dv (S, H) from dout (S, H); ADDS into dbias_table (bias_table_size() entries, required
/// when that is > 0; may be nullptr otherwise).
template <class T>
void local_attention_backward(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in, const T* bias_table,
                              const LocalAttentionSaved<T>& saved, CMatrixMap<T> dout, Matrix<T>& dq, Matrix<T>& dk,
                              Matrix<T>& dv, T* dbias_table);

// ---- implementation ----

namespace detail {

// Score scratch. Eigen's vectorised exp and sum treat the unaligned head of a row with scalar code, so the rounding
// of a row depends on its address: buffers aligned the same way make it depend on the block geometry only, which
// keeps the results independent of the thread count and the backward's weights equal to the forward's.
template <class T>
using AlignedBuffer = std::vector<T, Eigen::aligned_allocator<T>>;

/// Grow-only per-thread score scratch, aligned (see above); reused across calls so the hot path allocates nothing.
template <class T>
T* attention_scratch(std::size_t n) {
  thread_local AlignedBuffer<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

struct AttentionShape {
  Index S = 0, Z = 0, H = 0;
};

template <class T>
AttentionShape check_attention_input(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                     const T* bias_table, const char* where) {
  cfg.validate(where);
  if (!in.offsets) throw ValueError(str_cat(where, ": offsets is nullptr (expected B+1 row offsets)"));
  const std::vector<Index>& off = *in.offsets;
  if (off.empty()) throw ShapeError(str_cat(where, ": offsets must have B+1 >= 1 entries, got 0"));
  if (off[0] != 0) throw ValueError(str_cat(where, ": offsets[0] must be 0, got ", off[0]));
  for (std::size_t b = 0; b + 1 < off.size(); ++b)
    if (off[b + 1] < off[b])
      throw ValueError(str_cat(where, ": offsets must be nondecreasing, offsets[", b, "] = ", off[b], " > offsets[",
                               b + 1, "] = ", off[b + 1]));
  AttentionShape sh;
  sh.S = off.back();
  sh.Z = in.q.cols();
  sh.H = in.v.cols();
  const auto rows_of = [&](const char* name, Index r, Index c) {
    return str_cat(where, ": ", name, " is (", r, ", ", c, ") but offsets.back() = ", sh.S);
  };
  if (in.q.rows() != sh.S) throw ShapeError(rows_of("q", in.q.rows(), in.q.cols()));
  if (in.k.rows() != sh.S) throw ShapeError(rows_of("k", in.k.rows(), in.k.cols()));
  if (in.v.rows() != sh.S) throw ShapeError(rows_of("v", in.v.rows(), in.v.cols()));
  if (in.k.cols() != sh.Z)
    throw ShapeError(str_cat(where, ": q is (", in.q.rows(), ", ", sh.Z, ") but k is (", in.k.rows(), ", ",
                             in.k.cols(), "); they need the same width Z"));
  if (sh.Z < 1) throw ShapeError(str_cat(where, ": q and k need a width Z >= 1, got ", sh.Z));
  if (cfg.position == PositionEncoding::rotary && sh.Z % 2 != 0)
    throw ShapeError(str_cat(where, ": rotary positions need an even width Z, got ", sh.Z));
  const bool needs_positions = cfg.position == PositionEncoding::simple || cfg.position == PositionEncoding::rotary;
  if (needs_positions && !in.positions)
    throw ValueError(str_cat(where, ": positions is nullptr but ", to_string(cfg.position), " positions need them"));
  if (in.positions) {
    if (static_cast<Index>(in.positions->size()) != sh.S)
      throw ShapeError(str_cat(where, ": positions has ", in.positions->size(), " entries, expected S = ", sh.S));
    if (needs_positions)
      for (std::size_t s = 0; s < in.positions->size(); ++s)
        if ((*in.positions)[s] < 0)
          throw ValueError(str_cat(where, ": positions must be >= 0, positions[", s, "] = ", (*in.positions)[s]));
  }
  if (in.key_valid && static_cast<Index>(in.key_valid->size()) != sh.S)
    throw ShapeError(str_cat(where, ": key_valid has ", in.key_valid->size(), " entries, expected S = ", sh.S));
  if (cfg.bias_table_size() > 0 && !bias_table)
    throw ValueError(str_cat(where, ": bias_table is nullptr but ", to_string(cfg.position), " positions need ",
                             cfg.bias_table_size(), " entries"));
  return sh;
}

template <class T>
Matrix<T> uninitialized_matrix(Index rows, Index cols) {
  Matrix<T> m(rows, cols);
#ifdef SMA_POISON_UNINITIALIZED
  m.setConstant(std::numeric_limits<T>::quiet_NaN());
#endif
  return m;
}

// Called first inside each of our parallel regions: it sets this region's own copy of OpenMP's nthreads-var, so
// Eigen runs the block GEMMs single-threaded even when the region is inactive (one thread). Otherwise Eigen would
// thread them itself, with blocking sizes (and thus rounding) that depend on the thread count.
inline void eigen_single_threaded_here() {
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
}

inline int attention_threads(const LocalAttentionConfig& cfg) {
#ifdef _OPENMP
  return cfg.threads > 0 ? cfg.threads : omp_get_max_threads();
#else
  (void)cfg;
  return 1;
#endif
}

/// Slots one query can see beyond itself: W back, and W ahead when bidirectional.
inline Index attention_reach(const LocalAttentionConfig& cfg) {
  return cfg.direction == Direction::causal ? cfg.window : 2 * cfg.window;
}

inline Index attention_block_size(const LocalAttentionConfig& cfg) {
  if (cfg.query_block > 0) return cfg.query_block;
  // Small windows get small blocks so that most of a block's score GEMM lands inside the band.
  const Index b = (2 * cfg.window + 7) / 8 * 8;
  return std::clamp<Index>(b, 16, 64);
}

struct QueryBlock {
  Index row_begin, row_end, q0, q1;  // the sequence's slots and the block's queries, absolute
};

inline Index block_key_begin(const LocalAttentionConfig& cfg, const QueryBlock& b) {
  return std::max(b.row_begin, b.q0 - cfg.window);
}
inline Index block_key_end(const LocalAttentionConfig& cfg, const QueryBlock& b) {
  return cfg.direction == Direction::causal ? b.q1 : std::min(b.row_end, b.q1 + cfg.window);
}
inline Index visible_begin(const LocalAttentionConfig& cfg, const QueryBlock& b, Index i) {
  return std::max(b.row_begin, i - cfg.window);
}
inline Index visible_end(const LocalAttentionConfig& cfg, const QueryBlock& b, Index i) {
  return cfg.direction == Direction::causal ? i + 1 : std::min(b.row_end, i + cfg.window + 1);
}

/// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche, cheap enough to run per attention pair.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Attention-dropout mask as a function of (seed, query slot, key slot): the backward regenerates it exactly.
struct DropoutMask {
  bool on = false;
  std::uint64_t seed = 0;
  std::uint64_t threshold = 0;  // dropped when the hash's top 53 bits fall below p * 2^53
  double keep_scale = 1.0;

  DropoutMask() = default;
  DropoutMask(double p, std::uint64_t s)
      : on(p > 0), seed(mix64(s)), threshold(static_cast<std::uint64_t>(p * 9007199254740992.0)),
        keep_scale(1.0 / (1.0 - p)) {}

  bool keep(Index i, Index j) const {
    const std::uint64_t h = mix64(seed ^ mix64(static_cast<std::uint64_t>(i) * 0x9e3779b97f4a7c15ULL +
                                               static_cast<std::uint64_t>(j)));
    return (h >> 11) >= threshold;
  }

  /// x[t] *= m(i, lo + t), t < n.
  template <class T>
  void apply(Index i, Index lo, Index n, T* x) const {
    const T scale = static_cast<T>(keep_scale);
    for (Index t = 0; t < n; ++t) x[t] = keep(i, lo + t) ? x[t] * scale : T(0);
  }
};

/// What the per-row kernels read besides the scores.
template <class T>
struct RowContext {
  const T* table = nullptr;
  const std::int64_t* pos = nullptr;
  const std::uint8_t* key_valid = nullptr;
  Index max_positions = 1;
  Index window = 1;
  DropoutMask dropout;
};

template <class T>
struct Laplace {
  // MEGA's laplace attention: 0.5 * (1 + erf((s - mu) / (sigma sqrt 2))), mu = sqrt(1/2), sigma = sqrt(1/(4 pi)).
  static constexpr double mu = 0.70710678118654752440;
  static constexpr double sigma = 0.28209479177387814347;
  static constexpr double inv_sigma_sqrt2 = 1.0 / (sigma * 1.41421356237309504880);
  static constexpr double pdf_scale = 1.0 / (sigma * 2.50662827463100050242);  // 1 / (sigma sqrt(2 pi))
};

// The per-row work between the GEMMs. A row holds the scores of query i against the block's keys k0..k0+nk-1; the
// visible ones are [lo, hi). Loops are written over contiguous spans so that they vectorise.
template <class T, AttentionActivation A, PositionEncoding P>
struct RowKernel {
  using Span = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  static constexpr bool kHasTable = P == PositionEncoding::simple || P == PositionEncoding::local_simple;
  static constexpr T kInf = std::numeric_limits<T>::infinity();

  // x[t] += b(i, lo + t), t < n.
  static void add_bias(const RowContext<T>& c, Index i, Index lo, Index n, T* x) {
    if constexpr (P == PositionEncoding::simple) {
      const std::int64_t base = static_cast<std::int64_t>(c.max_positions) - 1 - c.pos[i];
      const std::int64_t top = 2 * static_cast<std::int64_t>(c.max_positions) - 2;
      const std::int64_t* pj = c.pos + lo;
      for (Index t = 0; t < n; ++t) x[t] += c.table[std::clamp<std::int64_t>(base + pj[t], 0, top)];
    } else if constexpr (P == PositionEncoding::local_simple) {
      const T* w = c.table + local_bias_index(c.window, i, lo);
      for (Index t = 0; t < n; ++t) x[t] += w[t];
    }
  }

  // dbias[index(i, lo + t) - offset] += d[t], t < n.
  static void add_bias_grad(const RowContext<T>& c, Index i, Index lo, Index n, const T* d, double* dbias,
                            Index offset) {
    if constexpr (P == PositionEncoding::simple) {
      const std::int64_t base = static_cast<std::int64_t>(c.max_positions) - 1 - c.pos[i];
      const std::int64_t top = 2 * static_cast<std::int64_t>(c.max_positions) - 2;
      const std::int64_t* pj = c.pos + lo;
      for (Index t = 0; t < n; ++t) dbias[std::clamp<std::int64_t>(base + pj[t], 0, top) - offset] += d[t];
    } else if constexpr (P == PositionEncoding::local_simple) {
      double* db = dbias + (local_bias_index(c.window, i, lo) - offset);
      for (Index t = 0; t < n; ++t) db[t] += d[t];
    }
  }

  // x[t] = value where key lo + t is masked.
  static void mask_keys(const RowContext<T>& c, Index lo, Index n, T* x, T value) {
    if (!c.key_valid) return;
    const std::uint8_t* kv = c.key_valid + lo;
    for (Index t = 0; t < n; ++t)
      if (!kv[t]) x[t] = value;
  }

  /// Turns the raw scores q'_i.k'_j (row[0..nk), keys k0..) into weights a_ij in place; returns the log-sum-exp
  /// (softmax; +inf when no key is visible) or 0.
  static T forward_row(const RowContext<T>& c, Index i, Index k0, Index nk, Index lo, Index hi, T* row) {
    const T stat = forward_weights(c, i, k0, nk, lo, hi, row);
    if (c.dropout.on) c.dropout.apply(i, lo, hi - lo, row + (lo - k0));
    return stat;
  }

  static T forward_weights(const RowContext<T>& c, Index i, Index k0, Index nk, Index lo, Index hi, T* row) {
    std::fill(row, row + (lo - k0), T(0));
    std::fill(row + (hi - k0), row + nk, T(0));
    const Index n = hi - lo;
    T* x = row + (lo - k0);
    Span seg(x, n);
    add_bias(c, i, lo, n, x);
    if constexpr (A == AttentionActivation::softmax) {
      mask_keys(c, lo, n, x, -kInf);
      const T m = seg.maxCoeff();
      if (m == -kInf) {
        seg.setZero();
        return kInf;
      }
      // Eigen's exp maps -inf to a tiny positive number, hence the second masking.
      seg = (seg - m).exp();
      mask_keys(c, lo, n, x, T(0));
      const T sum = seg.sum();
      seg *= T(1) / sum;
      return m + std::log(sum);
    } else if constexpr (A == AttentionActivation::relu2) {
      seg = seg.max(T(0)).square();
      mask_keys(c, lo, n, x, T(0));
      return T(0);
    } else {
      for (Index t = 0; t < n; ++t)
        x[t] = T(0.5) * (T(1) + std::erf((x[t] - T(Laplace<T>::mu)) * T(Laplace<T>::inv_sigma_sqrt2)));
      mask_keys(c, lo, n, x, T(0));
      return T(0);
    }
  }

  /// In: row_s = raw scores, row_d = dO V^T. Out: row_s = the weights as the forward used them (m * a), row_d =
  /// dS = d loss / d s. Scatters dS into dbias[index - dbias_offset] when dbias is given. `lse` is used when
  /// have_lse (softmax only).
  static void backward_row(const RowContext<T>& c, Index i, Index k0, Index nk, Index lo, Index hi, T lse,
                           bool have_lse, T* row_s, T* row_d, double* dbias, Index dbias_offset) {
    std::fill(row_s, row_s + (lo - k0), T(0));
    std::fill(row_s + (hi - k0), row_s + nk, T(0));
    std::fill(row_d, row_d + (lo - k0), T(0));
    std::fill(row_d + (hi - k0), row_d + nk, T(0));
    const Index n = hi - lo;
    T* x = row_s + (lo - k0);
    T* d = row_d + (lo - k0);
    if (c.dropout.on) c.dropout.apply(i, lo, n, d);  // dA = m * (dO V^T)
    weights_and_score_grad(c, i, lo, n, lse, have_lse, x, d);
    if (c.dropout.on) c.dropout.apply(i, lo, n, x);
    if constexpr (kHasTable) {
      if (dbias) add_bias_grad(c, i, lo, n, d, dbias, dbias_offset);
    }
  }

  // x: raw scores -> a; d: dA -> dS, over the n visible keys lo.. of query i.
  static void weights_and_score_grad(const RowContext<T>& c, Index i, Index lo, Index n, T lse, bool have_lse, T* x,
                                     T* d) {
    Span seg(x, n), dseg(d, n);
    add_bias(c, i, lo, n, x);
    if constexpr (A == AttentionActivation::softmax) {
      mask_keys(c, lo, n, x, -kInf);
      if (!have_lse) {
        const T m = seg.maxCoeff();
        lse = kInf;
        if (m != -kInf) {
          T sum = 0;
          for (Index t = 0; t < n; ++t) sum += std::exp(x[t] - m);
          lse = m + std::log(sum);
        }
      }
      if (lse == kInf) {
        seg.setZero();
        dseg.setZero();
        return;
      }
      seg = (seg - lse).exp();
      mask_keys(c, lo, n, x, T(0));
      const T dot = (seg * dseg).sum();
      dseg = seg * (dseg - dot);
    } else if constexpr (A == AttentionActivation::relu2) {
      mask_keys(c, lo, n, x, T(0));
      seg = seg.max(T(0));
      dseg *= T(2) * seg;
      seg = seg.square();
    } else {
      for (Index t = 0; t < n; ++t) {
        const T z = (x[t] - T(Laplace<T>::mu)) * T(Laplace<T>::inv_sigma_sqrt2);
        x[t] = T(0.5) * (T(1) + std::erf(z));
        d[t] *= T(Laplace<T>::pdf_scale) * std::exp(-z * z);
      }
      mask_keys(c, lo, n, x, T(0));
      mask_keys(c, lo, n, d, T(0));
    }
  }
};

/// Calls f(std::integral_constant<AttentionActivation, A>, std::integral_constant<PositionEncoding, P>) for the
/// configuration's pair, so the per-element loops are compiled once per combination.
template <class F>
void dispatch_attention(const LocalAttentionConfig& cfg, F&& f) {
  using AA = AttentionActivation;
  using PE = PositionEncoding;
  const auto with_pos = [&](auto a) {
    switch (cfg.position) {
      case PE::none: return f(a, std::integral_constant<PE, PE::none>{});
      case PE::simple: return f(a, std::integral_constant<PE, PE::simple>{});
      case PE::local_simple: return f(a, std::integral_constant<PE, PE::local_simple>{});
      case PE::rotary: return f(a, std::integral_constant<PE, PE::rotary>{});
    }
    throw ValueError("local attention: unknown position encoding");
  };
  switch (cfg.activation) {
    case AA::relu2: return with_pos(std::integral_constant<AA, AA::relu2>{});
    case AA::softmax: return with_pos(std::integral_constant<AA, AA::softmax>{});
    case AA::laplace: return with_pos(std::integral_constant<AA, AA::laplace>{});
  }
  throw ValueError("local attention: unknown activation");
}

/// q' = scale * rot(q) and k' = rot(k). Without rotary nothing is copied: a block's q' is scaled into per-thread
/// scratch when it is used (q_block). With rotary, rotated copies of q and k (S x Z each) are made once.
template <class T>
struct PreparedQK {
  Matrix<T> qr;  // (S, Z) rotated q for rotary, else empty
  Matrix<T> kr;  // (S, Z) rotated k for rotary, else empty (k is used as is)
  const T* q = nullptr;
  const T* k = nullptr;
  Index Z = 0;
  T scale = T(1);

  PreparedQK(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in, const AttentionShape& sh, int threads)
      : Z(sh.Z), scale(static_cast<T>(cfg.query_scale(sh.Z))) {
    q = in.q.data();
    k = in.k.data();
    if (cfg.position == PositionEncoding::rotary && sh.S > 0) {
      qr = in.q;
      kr = in.k;
      rotary_apply<T>(qr.data(), kr.data(), sh.S, sh.Z, in.positions->data(), cfg.rotary_theta, 1.0, threads);
      q = qr.data();
      k = kr.data();
    }
  }

  /// q' rows q0..q0+nq-1, written into `scratch` (nq * Z entries).
  MatrixMap<T> q_block(Index q0, Index nq, T* scratch) const {
    MatrixMap<T> m(scratch, nq, Z);
    m = scale * CMatrixMap<T>(q + q0 * Z, nq, Z);
    return m;
  }
};

inline std::vector<QueryBlock> make_query_blocks(const std::vector<Index>& off, Index block) {
  std::vector<QueryBlock> blocks;
  for (std::size_t b = 0; b + 1 < off.size(); ++b)
    for (Index q0 = off[b]; q0 < off[b + 1]; q0 += block)
      blocks.push_back({off[b], off[b + 1], q0, std::min(off[b + 1], q0 + block)});
  return blocks;
}

// A run of consecutive query blocks of one sequence, processed by one thread in order in the backward.
struct Segment {
  Index row_begin, row_end, s0, s1;
  int colour;
  Index bias_lo = 0, bias_hi = 0;  // table indices [lo, hi) this segment may touch
};

template <class T>
RowContext<T> make_row_context(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in, const T* table) {
  RowContext<T> c;
  c.table = table;
  c.pos = in.positions ? in.positions->data() : nullptr;
  c.key_valid = in.key_valid ? in.key_valid->data() : nullptr;
  c.max_positions = cfg.max_positions;
  c.window = cfg.window;
  c.dropout = DropoutMask(cfg.dropout, cfg.dropout_seed);
  return c;
}

}  // namespace detail

template <class T, class Sink>
void local_attention_forward_blocks(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                    const T* bias_table, LocalAttentionSaved<T>* saved, Sink&& sink) {
  static_assert(std::is_floating_point<T>::value, "sma::ops::local_attention_forward: T must be float or double");
  const detail::AttentionShape sh = detail::check_attention_input(cfg, in, bias_table, "local_attention_forward");
  const Index S = sh.S, Z = sh.Z, H = sh.H;
  const bool softmax = cfg.activation == AttentionActivation::softmax;
  if (saved) saved->row_stat.resize(softmax ? S : 0);
  if (S == 0) return;

  const int threads = detail::attention_threads(cfg);
  const detail::PreparedQK<T> prep(cfg, in, sh, threads);
  const CMatrixMap<T> K(prep.k, S, Z);  // (S, Z)
  const Index block = detail::attention_block_size(cfg);
  const std::vector<detail::QueryBlock> blocks = detail::make_query_blocks(*in.offsets, block);
  const Index n_blocks = static_cast<Index>(blocks.size());
  const Index nk_max = block + detail::attention_reach(cfg);
  const detail::RowContext<T> rc = detail::make_row_context(cfg, in, bias_table);
  T* stats = saved && softmax ? saved->row_stat.data() : nullptr;
  const bool parallel = threads > 1 && n_blocks > 1 && S * std::min(S, nk_max) * (Z + H) > (1 << 18);

  detail::dispatch_attention(cfg, [&](auto a_tag, auto p_tag) {
    using Kernel = detail::RowKernel<T, decltype(a_tag)::value, decltype(p_tag)::value>;
#pragma omp parallel num_threads(threads) if (parallel)
    {
      detail::eigen_single_threaded_here();
      T* scratch = detail::attention_scratch<T>(static_cast<std::size_t>(block * (nk_max + Z)));
      T* qbuf = scratch + block * nk_max;
#pragma omp for schedule(dynamic, 1)
      for (Index t = 0; t < n_blocks; ++t) {
        const detail::QueryBlock& b = blocks[static_cast<std::size_t>(t)];
        const Index k0 = detail::block_key_begin(cfg, b), nk = detail::block_key_end(cfg, b) - k0, nq = b.q1 - b.q0;
        MatrixMap<T> sc(scratch, nq, nk);                                           // (nq, nk)
        sc.noalias() = prep.q_block(b.q0, nq, qbuf) * K.middleRows(k0, nk).transpose();
        for (Index r = 0; r < nq; ++r) {
          const Index i = b.q0 + r;
          const T lse = Kernel::forward_row(rc, i, k0, nk, detail::visible_begin(cfg, b, i),
                                            detail::visible_end(cfg, b, i), scratch + r * nk);
          if (stats) stats[i] = lse;
        }
        sink(b.q0, nq, k0, nk, static_cast<const MatrixMap<T>&>(sc));
      }
    }
  });
}

template <class T>
void local_attention_forward_into(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                  const T* bias_table, LocalAttentionSaved<T>* saved, MatrixMap<T> out) {
  if (out.rows() != in.q.rows() || out.cols() != in.v.cols())
    throw ShapeError(str_cat("local_attention_forward: out is (", out.rows(), ", ", out.cols(), "), expected (",
                             in.q.rows(), ", ", in.v.cols(), ")"));
  local_attention_forward_blocks<T>(cfg, in, bias_table, saved,
                                    [&](Index q0, Index nq, Index k0, Index nk, const MatrixMap<T>& a) {
                                      out.middleRows(q0, nq).noalias() = a * in.v.middleRows(k0, nk);  // (nq, H)
                                    });
}

template <class T>
Matrix<T> local_attention_forward(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in,
                                  const T* bias_table, LocalAttentionSaved<T>* saved) {
  Matrix<T> out = detail::uninitialized_matrix<T>(in.q.rows(), in.v.cols());  // (S, H)
  local_attention_forward_into<T>(cfg, in, bias_table, saved, map(out));
  return out;
}

template <class T>
void local_attention_backward(const LocalAttentionConfig& cfg, const LocalAttentionInput<T>& in, const T* bias_table,
                              const LocalAttentionSaved<T>& saved, CMatrixMap<T> dout, Matrix<T>& dq, Matrix<T>& dk,
                              Matrix<T>& dv, T* dbias_table) {
  static_assert(std::is_floating_point<T>::value, "sma::ops::local_attention_backward: T must be float or double");
  const char* where = "local_attention_backward";
  const detail::AttentionShape sh = detail::check_attention_input(cfg, in, bias_table, where);
  const Index S = sh.S, Z = sh.Z, H = sh.H;
  if (dout.rows() != S || dout.cols() != H)
    throw ShapeError(str_cat(where, ": dout must be (", S, ", ", H, "), got (", dout.rows(), ", ", dout.cols(), ")"));
  const bool softmax = cfg.activation == AttentionActivation::softmax;
  const bool have_lse = softmax && saved.row_stat.size() > 0;
  if (softmax && saved.row_stat.size() != 0 && saved.row_stat.size() != S)
    throw ShapeError(str_cat(where, ": saved.row_stat has ", saved.row_stat.size(),
                             " entries, expected S = ", S, " (or 0 to recompute)"));
  const Index table_size = cfg.bias_table_size();
  if (table_size > 0 && !dbias_table)
    throw ValueError(str_cat(where, ": dbias_table is nullptr but ", to_string(cfg.position), " positions have a ",
                             table_size, "-entry table"));

  dq.resize(S, Z);  // every row is assigned below (resize keeps the caller's storage when the size matches)
#ifdef SMA_POISON_UNINITIALIZED
  dq.setConstant(std::numeric_limits<T>::quiet_NaN());
#endif
  dk.setZero(S, Z);
  dv.setZero(S, H);
  if (S == 0) return;

  const int threads = detail::attention_threads(cfg);
  const detail::PreparedQK<T> prep(cfg, in, sh, threads);
  const CMatrixMap<T> K(prep.k, S, Z);  // (S, Z)
  const T scale = static_cast<T>(cfg.query_scale(Z));
  const Index block = detail::attention_block_size(cfg);
  const Index reach = detail::attention_reach(cfg);
  const Index nk_max = block + reach;
  const detail::RowContext<T> rc = detail::make_row_context(cfg, in, bias_table);

  // Segments of >= reach slots: segments t and t+2 of a sequence touch disjoint key ranges, so all segments of one
  // colour (t mod 2) accumulate into dk, dv in parallel without races, and every key row receives its terms in
  // the same order whatever the thread count.
  const Index seg_len = (std::max(reach, block) + block - 1) / block * block;
  std::vector<detail::Segment> segs;
  const std::vector<Index>& off = *in.offsets;
  for (std::size_t b = 0; b + 1 < off.size(); ++b) {
    int colour = 0;
    for (Index s0 = off[b]; s0 < off[b + 1]; s0 += seg_len, colour ^= 1) {
      detail::Segment g{off[b], off[b + 1], s0, std::min(off[b + 1], s0 + seg_len), colour};
      if (table_size > 0) {
        const Index k0 = std::max(g.row_begin, g.s0 - cfg.window);
        const Index k1 = cfg.direction == Direction::causal ? g.s1 : std::min(g.row_end, g.s1 + cfg.window);
        if (cfg.position == PositionEncoding::simple) {
          const std::int64_t* p = rc.pos;
          const auto qr = std::minmax_element(p + g.s0, p + g.s1);
          const auto kr = std::minmax_element(p + k0, p + k1);
          g.bias_lo = simple_bias_index(cfg.max_positions, *qr.second, *kr.first);
          g.bias_hi = simple_bias_index(cfg.max_positions, *qr.first, *kr.second) + 1;
        } else {
          // Visible pairs have |j - i| <= W, so only entries [3W-1, 5W-1] can be touched.
          g.bias_lo = std::max(local_bias_index(cfg.window, g.s1 - 1, k0), 3 * cfg.window - 1);
          g.bias_hi = std::min(local_bias_index(cfg.window, g.s0, k1 - 1) + 1, 5 * cfg.window);
        }
      }
      segs.push_back(g);
    }
  }
  const Index n_segs = static_cast<Index>(segs.size());
  std::vector<std::vector<double>> seg_dbias(static_cast<std::size_t>(n_segs));
  const bool parallel = threads > 1 && S * std::min(S, nk_max) * (Z + H) > (1 << 17);

  detail::dispatch_attention(cfg, [&](auto a_tag, auto p_tag) {
    using Kernel = detail::RowKernel<T, decltype(a_tag)::value, decltype(p_tag)::value>;
    for (int colour = 0; colour < 2; ++colour) {
#pragma omp parallel num_threads(threads) if (parallel)
      {
        detail::eigen_single_threaded_here();
        T* s_buf = detail::attention_scratch<T>(static_cast<std::size_t>(block * (2 * nk_max + Z)));
        T* d_buf = s_buf + block * nk_max;
        T* qbuf = d_buf + block * nk_max;
#pragma omp for schedule(dynamic, 1)
        for (Index t = 0; t < n_segs; ++t) {
          const detail::Segment& g = segs[static_cast<std::size_t>(t)];
          if (g.colour != colour) continue;
          std::vector<double>& db = seg_dbias[static_cast<std::size_t>(t)];
          if (table_size > 0) db.assign(static_cast<std::size_t>(g.bias_hi - g.bias_lo), 0.0);
          for (Index q0 = g.s0; q0 < g.s1; q0 += block) {
            const detail::QueryBlock b{g.row_begin, g.row_end, q0, std::min(g.s1, q0 + block)};
            const Index k0 = detail::block_key_begin(cfg, b), nk = detail::block_key_end(cfg, b) - k0;
            const Index nq = b.q1 - b.q0;
            MatrixMap<T> sc(s_buf, nq, nk);                                         // (nq, nk) scores -> A
            MatrixMap<T> da(d_buf, nq, nk);                                         // (nq, nk) dA -> dS
            const MatrixMap<T> q_blk = prep.q_block(b.q0, nq, qbuf);                // (nq, Z)
            const auto k_blk = K.middleRows(k0, nk);                                // (nk, Z)
            const auto v_blk = in.v.middleRows(k0, nk);                             // (nk, H)
            const auto do_blk = dout.middleRows(b.q0, nq);                          // (nq, H)
            sc.noalias() = q_blk * k_blk.transpose();
            da.noalias() = do_blk * v_blk.transpose();
            for (Index r = 0; r < nq; ++r) {
              const Index i = b.q0 + r;
              Kernel::backward_row(rc, i, k0, nk, detail::visible_begin(cfg, b, i), detail::visible_end(cfg, b, i),
                                   have_lse ? saved.row_stat[i] : T(0), have_lse, s_buf + r * nk,
                                   d_buf + r * nk, db.empty() ? nullptr : db.data(), g.bias_lo);
            }
            dv.middleRows(k0, nk).noalias() += sc.transpose() * do_blk;             // (nk, H)
            dq.middleRows(b.q0, nq).noalias() = (scale * da) * k_blk;               // (nq, Z)
            dk.middleRows(k0, nk).noalias() += da.transpose() * q_blk;              // (nk, Z)
          }
        }
      }
    }
  });

  if (cfg.position == PositionEncoding::rotary)
    detail::rotary_apply<T>(dq.data(), dk.data(), S, Z, in.positions->data(), cfg.rotary_theta, -1.0, threads);

  if (table_size > 0) {
    // One double accumulator per entry, filled in segment order, so the sum does not depend on the threads.
    std::vector<double> acc(static_cast<std::size_t>(table_size), 0.0);
    for (Index t = 0; t < n_segs; ++t) {
      const std::vector<double>& db = seg_dbias[static_cast<std::size_t>(t)];
      const Index lo = segs[static_cast<std::size_t>(t)].bias_lo;
      for (std::size_t e = 0; e < db.size(); ++e) acc[static_cast<std::size_t>(lo) + e] += db[e];
    }
    for (Index e = 0; e < table_size; ++e) dbias_table[e] += static_cast<T>(acc[static_cast<std::size_t>(e)]);
  }
}

}  // namespace sma::ops
