// sma/layers/dropout.hpp: inverted dropout (PyTorch's nn.Dropout) as a layer and as matrix helpers for layers that
// drop elements of packed matrices (attention weights, v, the hidden units of a feed-forward block).
//
// Maths and the mask's draw order: docs/maths/linear_activation.md#dropout.
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/layer.hpp>
#include <sma/core/tensor.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

namespace sma {

namespace detail {

inline void check_dropout_rate(double p, const char* who) {
  if (!(p >= 0.0 && p <= 1.0)) throw ValueError(str_cat(who, ": dropout rate must be in [0, 1], got ", p));
}

}  // namespace detail

/// Fills `mask` (resized to rows x cols) with 0 (dropped, probability p) or 1/(1-p) (kept), drawing from `rng`.
/// p = 1 drops everything (the mask is all zero, as PyTorch's output). Deterministic for a given rng state: one
/// 53-bit draw per element, in row-major order.
template <class T>
void make_dropout_mask(Matrix<T>& mask, Index rows, Index cols, double p, std::mt19937_64& rng) {
  detail::check_dropout_rate(p, "make_dropout_mask");
  mask.resize(rows, cols);
  const std::uint64_t threshold = static_cast<std::uint64_t>(std::ldexp(p, 53));  // drop when draw < threshold
  const T keep = p < 1.0 ? static_cast<T>(1.0 / (1.0 - p)) : T(0);
  T* m = mask.data();
  for (Index i = 0; i < mask.size(); ++i) m[i] = (rng() >> 11) < threshold ? T(0) : keep;
}

/// Dropout on a packed matrix, in place: in train mode with p > 0 draws `mask` from ctx.rng and multiplies x by it;
/// otherwise leaves x alone and empties `mask` (an empty mask means "identity" to dropout_backward_inplace).
/// `x` may be any writable Eigen matrix, map or block.
template <class Derived>
void dropout_inplace(Context& ctx, double p, const Eigen::MatrixBase<Derived>& x_,
                     Matrix<typename Derived::Scalar>& mask) {
  detail::check_dropout_rate(p, "dropout_inplace");
  auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);  // Eigen's idiom for writable temporaries
  if (!ctx.training() || p == 0.0) {
    mask.resize(0, 0);
    return;
  }
  make_dropout_mask(mask, x.rows(), x.cols(), p, ctx.rng);
  x.array() *= mask.array();
}

/// The backward of dropout_inplace: g *= mask, or nothing when the mask is empty (dropout was the identity).
template <class Derived>
void dropout_backward_inplace(const Matrix<typename Derived::Scalar>& mask, const Eigen::MatrixBase<Derived>& g_) {
  if (mask.size() == 0) return;
  auto& g = const_cast<Eigen::MatrixBase<Derived>&>(g_);
  if (mask.rows() != g.rows() || mask.cols() != g.cols())
    throw ShapeError(str_cat("dropout_backward: mask is (", mask.rows(), ", ", mask.cols(), ") but the gradient is (",
                             g.rows(), ", ", g.cols(), ")"));
  g.array() *= mask.array();
}

/// Dropout<T, D>: inverted dropout, PyTorch's nn.Dropout(p).
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// MATHS     train mode: y = x * m, m_i = 0 with probability p, else 1/(1-p), drawn from ctx.rng;
///           eval mode, or p = 0: y = x (no draw, so the rng is not advanced).
/// PARAMS    none.
/// CACHE     the mask (empty when the layer was the identity).
/// GRADIENTS backward returns dx = dy * m (dy itself for the identity).
template <class T, Index D = Dynamic>
class Dropout {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    double p = 0.0;
  };
  struct Cache {
    Matrix<T> mask;  // (B*L, D), or empty
    Index batch = 0, length = 0, dim = 0;
  };

  Dropout() = default;
  explicit Dropout(const Config& cfg) : cfg_(cfg) { detail::check_dropout_rate(cfg.p, "Dropout"); }
  explicit Dropout(double p) : Dropout(Config{p}) {}

  double rate() const { return cfg_.p; }
  const Config& config() const { return cfg_; }

  template <class V>
  void visit_params(V&&) {}

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, D}, "Dropout::forward: x");
    cache.batch = x.dimension(0);
    cache.length = x.dimension(1);
    cache.dim = x.dimension(2);
    Tensor3<T> y = x;
    dropout_inplace(ctx, cfg_.p, as_matrix(y), cache.mask);
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.batch, cache.length, cache.dim}, "Dropout::backward: dy");
    Tensor3<T> dx = dy;
    dropout_backward_inplace(cache.mask, as_matrix(dx));
    return dx;
  }

 private:
  Config cfg_;
};

}  // namespace sma
