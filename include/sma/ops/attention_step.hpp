// sma/ops/attention_step.hpp: one query of SeqBoat's causal working-memory attention, for streaming decode.
//
// WHAT
//   The full forward (ops/local_attention.hpp) lets compressed slot i see the keys of slots i-W .. i. When tokens
//   arrive one at a time, slot i is the newest activated token, and the keys it sees are its own plus those of the
//   last W activated tokens before it: a ring buffer of at most W entries. This op computes
//     s_j = q' . k'_j + bias(j)         over the n ring entries and the query's own key (k'_self)
//     a_j = relu2 / softmax / laplace of s_j, exactly as local_attention_forward's row kernel does
//     out = sum_j a_j v_j
//   with q' = scale * rot(q) and k' = rot(k) prepared by `attention_step_prepare` (the same rotation code, in the
//   same order, as the full forward). bias(j): simple -> table[simple_bias_index(P, pos_q, pos_j)] with ORIGINAL
//   positions; local_simple -> table[local_bias_index(W, ord_q, ord_j)] with the tokens' activated-token ordinals
//   (= their compressed slot indices); rotary and none -> 0.
//
// SHAPES
//   q', k'_self (Z); v_self (H); ring keys (n, Z), ring values (n, H), n <= W, rows in any order; out (H).
//   positions / ordinals: n entries each (only the ones the encoding reads need be given).
//
// COST  O(n (Z + H)) per query: two matrix-vector products over the ring, no allocation (the caller passes
//   scratch of n + 1 entries).
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>
#include <sma/core/tensor.hpp>
#include <sma/ops/local_attention.hpp>
#include <sma/ops/rel_pos.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace sma::ops {

/// The working memory one query sees besides its own key: `n` entries of a ring buffer (any order).
template <class T>
struct AttentionStepMemory {
  const T* keys = nullptr;                 ///< (n, Z) row-major, already rotated (rotary)
  const T* values = nullptr;               ///< (n, H) row-major
  const std::int64_t* positions = nullptr; ///< n original positions (simple); may be nullptr otherwise
  const std::int64_t* ordinals = nullptr;  ///< n activated-token ordinals (local_simple); may be nullptr otherwise
  Index n = 0;
};

/// In place: q <- scale * rot(q, pos), k <- rot(k, pos) (rotation only for rotary positions). Both (Z).
/// The same helper and order of operations as the full forward's PreparedQK, so the prepared rows are identical.
template <class T>
void attention_step_prepare(const LocalAttentionConfig& cfg, T* q, T* k, Index z, std::int64_t pos) {
  if (cfg.position == PositionEncoding::rotary)
    detail::rotary_apply<T>(q, k, 1, z, &pos, cfg.rotary_theta, 1.0, 1);
  const T scale = static_cast<T>(cfg.query_scale(z));
  for (Index i = 0; i < z; ++i) q[i] *= scale;
}

/// out (H) = attention of the prepared query q (Z) over `mem` and its own key/value. `scratch` holds mem.n + 1
/// entries. `bias_table` must hold cfg.bias_table_size() entries when that is > 0. Causal configurations only.
template <class T>
void attention_step(const LocalAttentionConfig& cfg, const T* q, Index z, Index h, std::int64_t q_pos,
                    std::int64_t q_ordinal, const T* k_self, const T* v_self, const AttentionStepMemory<T>& mem,
                    const T* bias_table, T* scratch, T* out) {
  using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  const Index n = mem.n;
  if (n < 0 || n > cfg.window)
    throw ValueError(str_cat("attention_step: the memory holds ", n, " keys; a causal window of ", cfg.window,
                             " allows 0 .. ", cfg.window));
  if (cfg.direction != Direction::causal)
    throw ValueError("attention_step: streaming needs a causal configuration (a bidirectional query looks ahead)");
  if (cfg.bias_table_size() > 0 && !bias_table)
    throw ValueError(str_cat("attention_step: ", to_string(cfg.position), " positions need the bias table"));
  if (n > 0 && cfg.position == PositionEncoding::simple && !mem.positions)
    throw ValueError("attention_step: simple positions need the memory's positions");
  if (n > 0 && cfg.position == PositionEncoding::local_simple && !mem.ordinals)
    throw ValueError("attention_step: local_simple positions need the memory's ordinals");

  const CVectorMap<T> qv(q, z);
  Eigen::Map<Arr> s(scratch, n + 1);  // entries 0..n-1: the memory; entry n: the query's own key
  if (n > 0) s.head(n).matrix().noalias() = CMatrixMap<T>(mem.keys, n, z) * qv;
  s[n] = qv.dot(CVectorMap<T>(k_self, z));

  if (cfg.position == PositionEncoding::simple) {
    for (Index j = 0; j < n; ++j) s[j] += bias_table[simple_bias_index(cfg.max_positions, q_pos, mem.positions[j])];
    s[n] += bias_table[simple_bias_index(cfg.max_positions, q_pos, q_pos)];
  } else if (cfg.position == PositionEncoding::local_simple) {
    for (Index j = 0; j < n; ++j) {
      const std::int64_t d = mem.ordinals[j] - q_ordinal;  // in [-W, -1]
      if (d < -cfg.window || d >= 0)
        throw ValueError(str_cat("attention_step: memory key ordinal ", mem.ordinals[j], " is outside the window of ",
                                 "query ordinal ", q_ordinal));
      s[j] += bias_table[local_bias_index(cfg.window, 0, static_cast<Index>(d))];
    }
    s[n] += bias_table[local_bias_index(cfg.window, 0, 0)];
  }

  switch (cfg.activation) {
    case AttentionActivation::relu2:
      s = s.max(T(0)).square();
      break;
    case AttentionActivation::softmax: {
      const T m = s.maxCoeff();
      s = (s - m).exp();
      s *= T(1) / s.sum();
      break;
    }
    case AttentionActivation::laplace:
      for (Index j = 0; j <= n; ++j)
        s[j] = T(0.5) * (T(1) + std::erf((s[j] - T(detail::Laplace<T>::mu)) * T(detail::Laplace<T>::inv_sigma_sqrt2)));
      break;
  }

  VectorMap<T> o(out, h);
  o = s[n] * CVectorMap<T>(v_self, h);
  if (n > 0) o.noalias() += CMatrixMap<T>(mem.values, n, h).transpose() * s.head(n).matrix();
}

}  // namespace sma::ops
