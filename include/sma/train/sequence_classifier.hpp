// sma/train/sequence_classifier.hpp: SequenceClassifier<Body>, a classifier around ANY layer stack (a Seq, Repeat,
// Stack of blocks built from the composition templates): token embedding -> body -> LayerNorm -> mean over the
// real positions -> Linear to the classes. The way to train a custom hybrid without writing a model class.
#pragma once

#include <sma/core/layer.hpp>
#include <sma/layers/embedding.hpp>
#include <sma/layers/linear.hpp>
#include <sma/layers/norm.hpp>

#include <cstdint>
#include <vector>

namespace sma::train {

/// SequenceClassifier<Body>.
///
/// SHAPES    ids (B, L) int32 -> logits (B, classes). ctx.padding (B, L) marks padded positions: the body's layers
///           honour it, and the mean runs over real positions only.
/// PARAMS    embedding.weight (vocab, dim), body.<the body's names>, norm.weight/bias (dim), decoder.weight
///           (classes, dim), decoder.bias (classes).
/// GRADIENTS backward takes dlogits (B, classes) and adds to every parameter's gradient.
template <class Body>
class SequenceClassifier {
  static_assert(check_layer<Body>());

 public:
  using Scalar = typename Body::Scalar;
  using T = Scalar;
  struct Config {
    Index vocab_size = 0;
    std::int64_t padding_idx = -1;
    Index dim = 0;      ///< embedding width = the body's width
    Index classes = 0;
  };
  struct Cache {
    typename Embedding<T>::Cache embedding;
    typename Body::Cache body;
    typename LayerNorm<T>::Cache norm;
    Matrix<T> pooled;           ///< (B, dim)
    std::vector<Index> counts;  ///< real positions per row
    Index batch = 0, length = 0;
  };

  SequenceClassifier() = default;
  SequenceClassifier(const Config& cfg, Body body, std::uint64_t seed = 0)
      : cfg_(cfg),
        embedding_(typename Embedding<T>::Config{cfg.vocab_size, cfg.dim, cfg.padding_idx}, seed),
        body_(std::move(body)),
        norm_(typename LayerNorm<T>::Config{cfg.dim}),
        decoder_(typename Linear<T>::Config{cfg.dim, cfg.classes, true}, seed + 1) {}

  Body& body() { return body_; }
  const Body& body() const { return body_; }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "embedding.", embedding_);
    visit_child(v, "body.", body_);
    visit_child(v, "norm.", norm_);
    visit_child(v, "decoder.", decoder_);
  }

  Tensor2<T> forward(Context& ctx, const Tensor2<std::int32_t>& ids, Cache& c) const {
    const Index B = ids.dimension(0), L = ids.dimension(1), D = cfg_.dim;
    const Mask* pad = ctx.padding_for(B, L, "SequenceClassifier::forward");
    c.batch = B, c.length = L;
    const Tensor3<T> h = norm_.forward(ctx, body_.forward(ctx, embedding_.forward(ctx, ids, c.embedding), c.body), c.norm);
    c.pooled = Matrix<T>::Zero(B, D);
    c.counts.assign(static_cast<std::size_t>(B), 0);
    for (Index b = 0; b < B; ++b) {
      Index& n = c.counts[static_cast<std::size_t>(b)];
      for (Index t = 0; t < L; ++t)
        if (!is_padding(pad, b, t)) c.pooled.row(b) += as_matrix(h).row(b * L + t), ++n;
      if (n == 0) throw ValueError(str_cat("SequenceClassifier::forward: batch row ", b, " is all padding"));
      c.pooled.row(b) /= T(n);
    }
    Tensor2<T> logits(B, cfg_.classes);
    as_matrix(logits) = decoder_.forward_rows(cmap(c.pooled));
    return logits;
  }

  void backward(Context& ctx, const Tensor2<T>& dlogits, const Cache& c) {
    const Index B = c.batch, L = c.length, D = cfg_.dim;
    check_shape(dlogits, {B, cfg_.classes}, "SequenceClassifier::backward: dlogits");
    const Mask* pad = ctx.padding_for(B, L, "SequenceClassifier::backward");
    const Matrix<T> dpooled = decoder_.backward_rows(cmap(c.pooled), as_matrix(dlogits));
    Tensor3<T> dh = zeros<T, 3>({B, L, D});
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t)
        if (!is_padding(pad, b, t)) as_matrix(dh).row(b * L + t) = dpooled.row(b) / T(c.counts[static_cast<std::size_t>(b)]);
    embedding_.backward(ctx, body_.backward(ctx, norm_.backward(ctx, dh, c.norm), c.body), c.embedding);
  }

 private:
  Config cfg_;
  Embedding<T> embedding_;
  Body body_;
  LayerNorm<T> norm_;
  Linear<T> decoder_;
};

}  // namespace sma::train
