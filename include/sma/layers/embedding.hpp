// sma/layers/embedding.hpp: Embedding<T>, a lookup table from token ids to vectors (torch.nn.Embedding).
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

namespace sma {

/// Embedding<T>: y[b, t, :] = weight[ids(b, t), :].
///
/// SHAPES    ids (B, L) int32 in [0, num_embeddings) -> y (B, L, dim). Not a layer of the (B, L, D) -> (B, L, D')
///           contract: its input is integer ids, so it sits in front of a layer stack rather than inside one.
/// PARAMS    weight (num_embeddings, dim): PyTorch's nn.Embedding name and layout. Init N(0, init_std^2) (PyTorch
///           uses std 1; the default here is dim^-1/2 so that embeddings start at the scale of a LayerNorm output
///           divided by sqrt(dim), which trains more smoothly with the SeqBoat encoder behind it). The row
///           `padding_idx` (if >= 0) starts at 0 and never receives a gradient, as in PyTorch.
/// CACHE     the ids.
/// GRADIENTS backward scatter-adds dy into the rows of weight.grad that were looked up (one thread, in token order,
///           so the sum is deterministic). There is no input gradient (ids are discrete).
/// ERRORS    an id outside [0, num_embeddings) is a ValueError naming its position and value (never an
///           out-of-bounds read).
template <class T>
class Embedding {
 public:
  using Scalar = T;
  struct Config {
    Index num_embeddings = 0;      ///< V
    Index dim = 0;                 ///< D
    std::int64_t padding_idx = -1; ///< a row kept at zero with no gradient, or -1 for none
    double init_std = 0.0;         ///< 0: dim^-1/2
  };
  struct Cache {
    Tensor2<std::int32_t> ids;
  };

  Embedding() = default;
  explicit Embedding(const Config& cfg, std::uint64_t seed = 0) : cfg_(cfg), weight_("weight", {cfg.num_embeddings, cfg.dim}) {
    if (cfg.num_embeddings < 1 || cfg.dim < 1)
      throw ValueError(str_cat("Embedding: num_embeddings and dim must be >= 1, got ", cfg.num_embeddings, " and ",
                               cfg.dim));
    if (cfg.padding_idx >= cfg.num_embeddings)
      throw ValueError(str_cat("Embedding: padding_idx ", cfg.padding_idx, " is outside [0, ", cfg.num_embeddings, ")"));
    reset_parameters(seed);
  }

  const Config& config() const { return cfg_; }
  Param<T>& weight() { return weight_; }
  const Param<T>& weight() const { return weight_; }

  /// Normal init with the configured standard deviation; the padding row is zero. Writes in place (a ParamBuffer
  /// bound to this layer stays valid).
  void reset_parameters(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, cfg_.init_std > 0 ? cfg_.init_std : 1.0 / std::sqrt(double(cfg_.dim)));
    for (Index i = 0; i < weight_.size(); ++i) weight_.data()[i] = static_cast<T>(normal(rng));
    if (cfg_.padding_idx >= 0) weight_.mat().row(cfg_.padding_idx).setZero();
  }

  template <class V>
  void visit_params(V&& v) {
    v("weight", weight_);
  }

  Tensor3<T> forward(const Context&, const Tensor2<std::int32_t>& ids, Cache& cache) const {
    const Index B = ids.dimension(0), L = ids.dimension(1), D = cfg_.dim;
    check_ids(ids);
    cache.ids = ids;
    Tensor3<T> y = uninitialized<T, 3>({B, L, D});
    MatrixMap<T> Y = as_matrix(y);
    const CMatrixMap<T> W = weight_.mat();
    for (Index i = 0; i < B * L; ++i) Y.row(i) = W.row(ids.data()[i]);
    return y;
  }

  /// Adds dy's rows into the gradient of the rows that forward looked up.
  void backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    const Index B = cache.ids.dimension(0), L = cache.ids.dimension(1);
    check_shape(dy, {B, L, cfg_.dim}, "Embedding::backward: dy");
    MatrixMap<T> G = weight_.grad_mat();
    const CMatrixMap<T> dY = as_matrix(dy);
    for (Index i = 0; i < B * L; ++i) {
      const std::int32_t id = cache.ids.data()[i];
      if (id == cfg_.padding_idx) continue;
      G.row(id) += dY.row(i);
    }
  }

 private:
  void check_ids(const Tensor2<std::int32_t>& ids) const {
    for (Index i = 0; i < ids.size(); ++i) {
      const std::int32_t id = ids.data()[i];
      if (id < 0 || id >= cfg_.num_embeddings)
        throw ValueError(str_cat("Embedding::forward: token id ", id, " at (", i / ids.dimension(1), ", ",
                                 i % ids.dimension(1), ") is outside [0, ", cfg_.num_embeddings, ")"));
    }
  }

  Config cfg_;
  Param<T> weight_;
};

}  // namespace sma
