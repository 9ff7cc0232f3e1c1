// sma/layers/ffn.hpp: the official LM's NormalizedFeedForwardNetwork (fairseq module of the SeqBoat repository):
// a two-layer MLP with a residual connection and a pre- or post-norm. Its backward chains those of Linear, the
// activations and the norms: docs/maths/linear_activation.md, docs/maths/norms.md.
#pragma once

#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/layers/activation.hpp>
#include <sma/layers/dropout.hpp>
#include <sma/layers/linear.hpp>
#include <sma/layers/norm.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <string>
#include <utility>

namespace sma {

/// Ffn<T, D>: NormalizedFeedForwardNetwork.
///
/// MATHS     residual = x; if prenorm: x = norm(x); h = hidden_dropout(act(fc1(x))); o = dropout(fc2(h));
///           y = o + residual; if not prenorm: y = norm(y).
/// SHAPES    x (B, L, D) -> y (B, L, D); fc1: D -> hidden, fc2: hidden -> D.
/// PARAMS    norm.norm.weight, norm.norm.bias, ... (a SequenceNorm member called "norm", see SequenceNorm);
///           fc1.weight (hidden, D), fc1.bias (hidden), fc2.weight (D, hidden), fc2.bias (D).
///           Init (reset_parameters(seed)): fc weights truncated normal std 0.02, biases 0 (the official
///           trunc_reset_parameters; the non-truncated variant differs only in the tails), norm weight 1, bias 0.
/// DROPOUT   plain element dropout (fairseq's FairseqDropout); feature dropout is not provided.
/// PADDING   ignored (every operation is per token, except a batchnorm's statistics, see BatchNorm).
/// CACHE     the norm's cache, the fc1 input (B, L, D), the fc1 output before the activation (S, hidden), both dropout
///           masks. The activation output is recomputed in backward instead of stored.
/// GRADIENTS backward returns dx and ADDS into fc1, fc2 and the norm's parameters.
template <class T, Index D = Dynamic>
class Ffn {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    Index dim = D;                             ///< model width (embed_dim)
    Index hidden = 0;                          ///< ffn_hidden_dim
    Activation activation = Activation::silu;  ///< the official default
    bool prenorm = true;
    NormType norm_type = NormType::layernorm;
    double dropout = 0.0;         ///< after fc2
    double hidden_dropout = 0.0;  ///< after the activation
    bool norm_affine = true;
  };
  struct Cache {
    typename SequenceNorm<T, D>::Cache norm;
    Tensor3<T> fc1_in;            // (B, L, D): normalised x (prenorm) or x
    Matrix<T> pre_act;            // (S, hidden)
    Matrix<T> hidden_mask, mask;  // (S, hidden), (S, D); empty when dropout was the identity
    Index batch = 0, length = 0;
  };

  Ffn() = default;
  explicit Ffn(const Config& cfg, std::uint64_t seed = 0)
      : cfg_(validated(cfg)),
        norm_({cfg.norm_type, cfg.dim, 1e-5, cfg.norm_affine}),
        fc1_({cfg.dim, cfg.hidden, true}),
        fc2_({cfg.hidden, cfg.dim, true}) {
    reset_parameters(seed);
  }

  const Config& config() const { return cfg_; }
  SequenceNorm<T, D>& norm() { return norm_; }
  Linear<T>& fc1() { return fc1_; }
  Linear<T>& fc2() { return fc2_; }

  /// fc1 and fc2 get seeds derived from `seed`; the norm goes back to weight 1, bias 0 (running stats reset).
  /// Everything is written in place, so a ParamBuffer bound to this layer stays valid.
  void reset_parameters(std::uint64_t seed) {
    fc1_.reset_parameters(seed * 2 + 1);
    fc2_.reset_parameters(seed * 2 + 2);
    norm_.reset_parameters();
  }

  /// The official module's order: norm, fc1, fc2.
  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "norm.", norm_);
    visit_child(v, "fc1.", fc1_);
    visit_child(v, "fc2.", fc2_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, cfg_.dim}, "Ffn::forward: x");
    if (ctx.check_finite) check_finite(x, "Ffn::forward: x");
    const Index B = x.dimension(0), L = x.dimension(1), S = B * L;
    cache.batch = B;
    cache.length = L;
    cache.fc1_in = cfg_.prenorm ? norm_.forward(ctx, x, cache.norm) : x;
    cache.pre_act.resize(S, cfg_.hidden);
    fc1_.forward_rows_into(as_matrix(cache.fc1_in), cache.pre_act);
    Matrix<T> h = activation_forward(cfg_.activation, cache.pre_act);  // (S, hidden)
    dropout_inplace(ctx, cfg_.hidden_dropout, h, cache.hidden_mask);

    Tensor3<T> y = uninitialized<T, 3>({B, L, cfg_.dim});
    MatrixMap<T> Y = as_matrix(y);
    fc2_.forward_rows_into(h, Y);
    dropout_inplace(ctx, cfg_.dropout, Y, cache.mask);
    Y += as_matrix(x);
    if (cfg_.prenorm) return y;
    return norm_.forward(ctx, y, cache.norm);
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.batch, cache.length, cfg_.dim}, "Ffn::backward: dy");
    // dz: gradient at the residual sum (after the post-norm's backward when there is one).
    Tensor3<T> dz_post;
    if (!cfg_.prenorm) dz_post = norm_.backward(ctx, dy, cache.norm);
    const CMatrixMap<T> dZ = as_matrix(cfg_.prenorm ? dy : static_cast<const Tensor3<T>&>(dz_post));

    // Gradient at fc2's output: dz through the output dropout (no copy when that dropout was the identity).
    Matrix<T> dO_masked;
    if (cache.mask.size()) {
      dO_masked = dZ;
      dropout_backward_inplace(cache.mask, dO_masked);
    }
    const CMatrixMap<T> dO = cache.mask.size() ? CMatrixMap<T>(dO_masked.data(), dO_masked.rows(), dO_masked.cols())
                                               : dZ;
    // One (S, hidden) buffer: first h = dropout(act(pre_act)), recomputed for fc2's weight gradient, then dh.
    Matrix<T> buf = activation_forward(cfg_.activation, cache.pre_act);
    if (cache.hidden_mask.size()) buf.array() *= cache.hidden_mask.array();
    fc2_.accumulate_param_grads(buf, dO);
    fc2_.backward_input_into(dO, buf);
    dropout_backward_inplace(cache.hidden_mask, buf);
    activation_backward_inplace(cfg_.activation, cache.pre_act, buf);

    fc1_.accumulate_param_grads(as_matrix(cache.fc1_in), buf);
    Tensor3<T> dx1 = uninitialized<T, 3>({cache.batch, cache.length, cfg_.dim});
    fc1_.backward_input_into(buf, as_matrix(dx1));
    Tensor3<T> dx = cfg_.prenorm ? norm_.backward(ctx, dx1, cache.norm) : std::move(dx1);
    as_matrix(dx) += dZ;
    return dx;
  }

 private:
  static Config validated(const Config& cfg) {
    if (cfg.dim <= 0 || cfg.hidden <= 0)
      throw ValueError(str_cat("Ffn: dim and hidden must be positive (dim = ", cfg.dim, ", hidden = ", cfg.hidden, ")"));
    checked_width(D, cfg.dim, "Ffn: dim");
    detail::check_dropout_rate(cfg.dropout, "Ffn: dropout");
    detail::check_dropout_rate(cfg.hidden_dropout, "Ffn: hidden_dropout");
    return cfg;
  }

  Config cfg_{D == Dynamic ? 0 : D};
  SequenceNorm<T, D> norm_;
  Linear<T> fc1_, fc2_;
};

}  // namespace sma
