// sma/train/task.hpp: how a model meets a batch. A Task names the batch type, cuts a batch into row shards, and
// runs forward (and backward) on one shard, returning loss sums and counts that add up over shards exactly.
//
//   ClassificationTask<Model>   data::Batch<T>: one label per row. Model::forward(Context&, x, Cache&) -> logits
//                               (B, C), with x = batch.values (B, L, F) or, for token data, batch.tokens (B, L)
//                               int32; Model::backward(Context&, const Tensor2<T>& dlogits, const Cache&).
//   LanguageModelTask<Model>    data::LmBatch: one target per position (-100 = none). Model::forward(Context&,
//                               const Tensor2<int32>& ids, Cache&) -> logits (B, L, V);
//                               Model::backward(Context&, const Tensor3<T>& dlogits, const Cache&).
//
// A Task provides: using Model, Scalar, Batch, Cache; static Index rows(b), targets(b), tokens(b);
// static Batch slice(b, r0, r1); static ShardResult run(Model&, Context&, const Batch&, Cache&, Index total_targets,
// bool backward). With backward, the gradient added to the parameters is that of (shard loss sum) / total_targets,
// so the shards of a batch together give the gradient of the batch's mean loss.
#pragma once

#include <sma/core/context.hpp>
#include <sma/data/char_lm.hpp>
#include <sma/data/dataset.hpp>
#include <sma/optim/loss.hpp>
#include <sma/train/activity.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma::train {

/// What one shard (or one evaluation batch) contributed.
struct ShardResult {
  double loss_sum = 0;  ///< sum of per-target negative log-likelihoods (nats)
  Index correct = 0;    ///< targets whose argmax is right
  Index counted = 0;    ///< targets
  Index tokens = 0;     ///< real (non-padded) input positions processed
  ActivityCounts activity;

  void add(const ShardResult& o) {
    loss_sum += o.loss_sum;
    correct += o.correct;
    counted += o.counted;
    tokens += o.tokens;
    activity.add(o.activity);
  }
  double loss() const { return counted ? loss_sum / double(counted) : 0.0; }
  double accuracy() const { return counted ? double(correct) / double(counted) : 0.0; }
};

namespace detail {

/// Rows [r0, r1) of a row-major tensor whose first extent is the batch.
template <class Scalar, int R>
Tensor<Scalar, R> slice_rows(const Tensor<Scalar, R>& t, Index r0, Index r1) {
  if (t.size() == 0) return t;
  auto d = dims_of(t);
  const Index row = t.size() / d[0];
  d[0] = r1 - r0;
  Tensor<Scalar, R> out(d);
  if (out.size()) std::memcpy(out.data(), t.data() + r0 * row, static_cast<std::size_t>(out.size()) * sizeof(Scalar));
  return out;
}

// Conversion-only stand-ins: a parameter of type `const Tensor2<int32>&` accepts them through their one
// user-defined conversion, while a `const Tensor3<T>&` parameter does not (that would take two conversions), even
// though Eigen lets any tensor expression construct any tensor implicitly.
struct TokensArg {
  operator const Tensor2<std::int32_t>&() const;
};
template <class T>
struct ValuesArg {
  operator const Tensor3<T>&() const;
};

template <class M, class = void>
struct accepts_tokens : std::false_type {};
template <class M>
struct accepts_tokens<M, std::void_t<decltype(std::declval<const M&>().forward(
                             std::declval<Context&>(), std::declval<TokensArg>(), std::declval<typename M::Cache&>()))>>
    : std::true_type {};

template <class M, class = void>
struct accepts_values : std::false_type {};
template <class M>
struct accepts_values<M, std::void_t<decltype(std::declval<const M&>().forward(
                             std::declval<Context&>(), std::declval<ValuesArg<typename M::Scalar>>(),
                             std::declval<typename M::Cache&>()))>> : std::true_type {};

/// The padding mask to hand to the layers: none when every position is real (layers then skip masking work).
inline const Mask* padding_if_any(const Mask& m) {
  for (Index i = 0; i < m.size(); ++i)
    if (m.data()[i]) return &m;
  return nullptr;
}

}  // namespace detail

template <class ModelT>
struct ClassificationTask {
  using Model = ModelT;
  using Scalar = typename Model::Scalar;
  using T = Scalar;
  using Batch = data::Batch<T>;
  using Cache = typename Model::Cache;

  static Index rows(const Batch& b) { return b.size(); }
  static Index targets(const Batch& b) { return static_cast<Index>(b.labels.size()); }
  static Index tokens(const Batch& b) {
    Index n = 0;
    for (Index l : b.lengths) n += l;
    return n;
  }

  static Batch slice(const Batch& b, Index r0, Index r1) {
    Batch s;
    s.tokens = detail::slice_rows(b.tokens, r0, r1);
    s.values = detail::slice_rows(b.values, r0, r1);
    s.padding = detail::slice_rows(b.padding, r0, r1);
    s.labels.assign(b.labels.begin() + r0, b.labels.begin() + r1);
    s.lengths.assign(b.lengths.begin() + r0, b.lengths.begin() + r1);
    s.indices.assign(b.indices.begin() + r0, b.indices.begin() + r1);
    return s;
  }

  /// The model's logits (B, C) for `b` (token or real-valued input, whichever the batch holds).
  static Tensor2<T> forward(const Model& m, Context& ctx, const Batch& b, Cache& c) {
    ctx.padding = detail::padding_if_any(b.padding);
    if (b.tokens.size() > 0) {
      if constexpr (detail::accepts_tokens<Model>::value)
        return m.forward(ctx, b.tokens, c);
      else
        throw ValueError("ClassificationTask: the batch holds tokens but the model takes real-valued input");
    } else {
      if constexpr (detail::accepts_values<Model>::value)
        return m.forward(ctx, b.values, c);
      else
        throw ValueError("ClassificationTask: the batch holds real values but the model takes token ids");
    }
  }

  static ShardResult run(Model& m, Context& ctx, const Batch& b, Cache& c, Index total_targets, bool backward) {
    ShardResult r;
    const Tensor2<T> logits = forward(m, ctx, b, c);
    Matrix<T> dlogits;
    const optim::LossResult lr = optim::cross_entropy<T>(as_matrix(logits), b.labels, backward ? &dlogits : nullptr);
    r.loss_sum = lr.loss * double(lr.counted);
    r.correct = lr.correct;
    r.counted = lr.counted;
    r.tokens = tokens(b);
    r.activity = activity_of(m, c, ctx.padding);
    if (backward && lr.counted > 0) {
      Tensor2<T> d(logits.dimension(0), logits.dimension(1));
      as_matrix(d) = dlogits * static_cast<T>(double(lr.counted) / double(total_targets));
      m.backward(ctx, d, c);
    }
    ctx.padding = nullptr;
    return r;
  }
};

template <class ModelT>
struct LanguageModelTask {
  using Model = ModelT;
  using Scalar = typename Model::Scalar;
  using T = Scalar;
  using Batch = data::LmBatch;
  using Cache = typename Model::Cache;

  static Index rows(const Batch& b) { return b.size(); }
  static Index targets(const Batch& b) { return b.num_targets(); }
  static Index tokens(const Batch& b) {
    Index n = 0;
    for (Index i = 0; i < b.padding.size(); ++i) n += b.padding.data()[i] ? 0 : 1;
    return n;
  }

  static Batch slice(const Batch& b, Index r0, Index r1) {
    Batch s;
    s.inputs = detail::slice_rows(b.inputs, r0, r1);
    s.targets = detail::slice_rows(b.targets, r0, r1);
    s.padding = detail::slice_rows(b.padding, r0, r1);
    return s;
  }

  static Tensor3<T> forward(const Model& m, Context& ctx, const Batch& b, Cache& c) {
    ctx.padding = detail::padding_if_any(b.padding);
    return m.forward(ctx, b.inputs, c);
  }

  static ShardResult run(Model& m, Context& ctx, const Batch& b, Cache& c, Index total_targets, bool backward) {
    ShardResult r;
    const Tensor3<T> logits = forward(m, ctx, b, c);
    Matrix<T> dlogits;
    const optim::LossResult lr = optim::cross_entropy<T>(as_matrix(logits), b.flat_targets(), backward ? &dlogits : nullptr);
    r.loss_sum = lr.loss * double(lr.counted);
    r.correct = lr.correct;
    r.counted = lr.counted;
    r.tokens = tokens(b);
    r.activity = activity_of(m, c, ctx.padding);
    if (backward && lr.counted > 0) {
      Tensor3<T> d(logits.dimension(0), logits.dimension(1), logits.dimension(2));
      as_matrix(d) = dlogits * static_cast<T>(double(lr.counted) / double(total_targets));
      m.backward(ctx, d, c);
    }
    ctx.padding = nullptr;
    return r;
  }
};

}  // namespace sma::train
