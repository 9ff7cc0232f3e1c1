// sma/compose/residual.hpp: Residual<L> (y = x + L(x)) and the norm placements PreNorm<Norm, L> (y = L(Norm(x)))
// and PostNorm<Norm, L> (y = Norm(L(x))). A pre-norm residual block is Residual<PreNorm<Norm, L>>; a post-norm one
// (the original Transformer's) is PostNorm<Norm, Residual<L>>.
#pragma once

#include <sma/compose/seq.hpp>
#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <string>
#include <utility>

namespace sma {

namespace detail {

/// The numbers appear in the instantiation name: assert_residual_widths<In, Out>.
template <Index In, Index Out>
constexpr bool assert_residual_widths() {
  static_assert(In == Dynamic || Out == Dynamic || In == Out,
                "sma::Residual: the wrapped layer must keep the width (kInDim == kOutDim) for x + L(x)");
  return true;
}

template <bool IsLayer, class L>
constexpr bool check_residual_if_layer() {
  if constexpr (IsLayer)
    return assert_residual_widths<L::kInDim, L::kOutDim>();
  else
    return true;
}

}  // namespace detail

/// Residual<L>: y = x + L(x).
///
/// SHAPES    x (B, L, D) -> y (B, L, D); L must map (B, L, D) to the same shape (checked at compile time where
///           the widths are fixed, and at run time: ShapeError naming both shapes).
/// PARAMS    L's, with no prefix by default (a residual connection is not a module in PyTorch); set_name("x")
///           puts them under "x.".
/// CACHE     L's cache.
/// GRADIENTS dx = dy + L.backward(dy); L adds into its own parameters.
#if SMA_HAS_CONCEPTS
template <Layer L>
#else
template <class L>
#endif
class Residual {
  static_assert(check_layer<L>());
  static_assert(detail::check_residual_if_layer<is_layer_v<L>, L>());

 public:
  using Scalar = typename L::Scalar;
  static constexpr Index kInDim = L::kInDim != Dynamic ? L::kInDim : L::kOutDim;
  static constexpr Index kOutDim = kInDim;
  struct Cache {
    typename L::Cache inner;
  };

  Residual() = default;
  explicit Residual(L inner) : inner_(std::move(inner)) {}

  Residual& set_name(std::string name) {
    name_ = std::move(name);
    return *this;
  }
  const std::string& name() const { return name_; }
  L& inner() { return inner_; }
  const L& inner() const { return inner_; }

  template <class V>
  void visit_params(V&& v) {
    detail::visit_named(v, name_, inner_);
  }

  Tensor3<Scalar> forward(Context& ctx, const Tensor3<Scalar>& x, Cache& cache) const {
    Tensor3<Scalar> y = inner_.forward(ctx, x, cache.inner);
    if (dims_of(y) != dims_of(x))
      throw ShapeError(str_cat("Residual::forward: the wrapped layer maps ", shape_string(dims_of(x)), " to ",
                               shape_string(dims_of(y)), "; x + L(x) needs the same shape"));
    as_matrix(y) += as_matrix(x);
    return y;
  }

  Tensor3<Scalar> backward(Context& ctx, const Tensor3<Scalar>& dy, const Cache& cache) {
    Tensor3<Scalar> dx = inner_.backward(ctx, dy, cache.inner);
    if (dims_of(dx) != dims_of(dy))
      throw ShapeError(str_cat("Residual::backward: the wrapped layer returned dx of shape ",
                               shape_string(dims_of(dx)), " for dy of shape ", shape_string(dims_of(dy))));
    as_matrix(dx) += as_matrix(dy);
    return dx;
  }

 private:
  L inner_;
  std::string name_;
};

/// PreNorm<Norm, L>: y = L(Norm(x)). A Seq<Norm, L> whose children are named "norm" and "layer".
#if SMA_HAS_CONCEPTS
template <Layer Norm, Layer L>
#else
template <class Norm, class L>
#endif
class PreNorm : public Seq<Norm, L> {
 public:
  PreNorm() { this->set_names({"norm", "layer"}); }
  PreNorm(Norm norm, L layer) : Seq<Norm, L>(std::move(norm), std::move(layer)) {
    this->set_names({"norm", "layer"});
  }
  Norm& norm() { return this->template get<0>(); }
  L& layer() { return this->template get<1>(); }
};

/// PostNorm<Norm, L>: y = Norm(L(x)). A Seq<L, Norm> whose children are named "layer" and "norm".
#if SMA_HAS_CONCEPTS
template <Layer Norm, Layer L>
#else
template <class Norm, class L>
#endif
class PostNorm : public Seq<L, Norm> {
 public:
  PostNorm() { this->set_names({"layer", "norm"}); }
  PostNorm(Norm norm, L layer) : Seq<L, Norm>(std::move(layer), std::move(norm)) {
    this->set_names({"layer", "norm"});
  }
  Norm& norm() { return this->template get<1>(); }
  L& layer() { return this->template get<0>(); }
};

}  // namespace sma
