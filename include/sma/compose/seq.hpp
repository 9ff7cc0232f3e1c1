// sma/compose/seq.hpp: Seq<Ls...>, a chain of layers y = L_{n-1}( ... L_1(L_0(x))) that is itself a layer.
//
// Misuse is caught at the template boundary with one readable message (STYLE.md 2.7): a type that is not a layer
// names the missing piece (check_layer), adjacent widths that disagree print
// "sma::Seq: kOutDim of layer I must equal kInDim of layer I+1" beside assert_widths_match<Out, In, I>, and mixed
// scalar types print "sma::Seq: all layers must use the same Scalar type".
#pragma once

#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <array>
#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace sma {

namespace detail {

/// Checks every adjacent pair (I, I+1) of the tuple's layers: widths first, then scalar types.
template <class Tuple, std::size_t... I>
constexpr bool check_chain(std::index_sequence<I...>) {
  return (true && ... &&
          (assert_widths_match<std::tuple_element_t<I, Tuple>::kOutDim, std::tuple_element_t<I + 1, Tuple>::kInDim,
                               Index(I)>() &&
           assert_scalars_match<std::tuple_element_t<I, Tuple>, std::tuple_element_t<I + 1, Tuple>, Index(I)>()));
}

/// Runs the pairwise checks only when every element is a layer, so a non-layer reports check_layer's message
/// alone instead of also failing inside the pair checks.
template <bool AllLayers, class Tuple>
constexpr bool check_chain_if_layers() {
  if constexpr (AllLayers && std::tuple_size<Tuple>::value >= 2)
    return check_chain<Tuple>(std::make_index_sequence<std::tuple_size<Tuple>::value - 1>{});
  else
    return true;
}

template <std::size_t N, std::size_t... I>
std::array<std::string, N> index_names(std::index_sequence<I...>) {
  return {{std::to_string(I)...}};
}

/// Visits `child` under `name` + "." (or with no prefix when `name` is empty).
template <class V, class Child>
void visit_named(V& v, const std::string& name, Child& child) {
  if (name.empty())
    child.visit_params(v);
  else
    visit_child(v, name + ".", child);
}

}  // namespace detail

/// Seq<Ls...>: the layers applied in order.
///
/// SHAPES    x (B, L, L0::kInDim) -> y (B, L, Ln::kOutDim); each layer's output feeds the next one.
/// REQUIRES  every Ls meets the layer contract; adjacent widths agree where both are fixed; one Scalar type.
/// PARAMS    the children's, prefixed "0.", "1.", ... by default, or by the names given to set_names(); an empty
///           name puts a child's parameters at this level (no prefix).
/// CACHE     the tuple of the children's caches.
/// GRADIENTS backward runs the children's backward in reverse order; each adds into its own parameters.
///
/// A named struct makes error messages and debugger output short:
///   struct Block : Seq<LayerNorm<float>, Linear<float>> { using Seq::Seq; };
#if SMA_HAS_CONCEPTS
template <Layer... Ls>
#else
template <class... Ls>
#endif
class Seq {
  static_assert(sizeof...(Ls) >= 1, "sma::Seq: needs at least one layer");
  // If this fires, one of Ls does not meet the layer contract: the message above says what it lacks.
  static_assert((check_layer<Ls>() && ...));
  static_assert(detail::check_chain_if_layers<(is_layer_v<Ls> && ...), std::tuple<Ls...>>());

 public:
  static constexpr std::size_t kSize = sizeof...(Ls);
  using Layers = std::tuple<Ls...>;
  using Scalar = typename std::tuple_element_t<0, Layers>::Scalar;
  static constexpr Index kInDim = std::tuple_element_t<0, Layers>::kInDim;
  static constexpr Index kOutDim = std::tuple_element_t<kSize - 1, Layers>::kOutDim;
  struct Cache {
    std::tuple<typename Ls::Cache...> children;
  };

  Seq() = default;
  explicit Seq(Ls... layers) : layers_(std::move(layers)...) {}

  /// Names of the children in visit_params ("0", "1", ... by default). Returns *this for chaining.
  Seq& set_names(std::array<std::string, kSize> names) {
    names_ = std::move(names);
    return *this;
  }
  const std::array<std::string, kSize>& names() const { return names_; }

  template <std::size_t I>
  std::tuple_element_t<I, Layers>& get() {
    return std::get<I>(layers_);
  }
  template <std::size_t I>
  const std::tuple_element_t<I, Layers>& get() const {
    return std::get<I>(layers_);
  }

  template <class V>
  void visit_params(V&& v) {
    visit_from<0>(v);
  }

  Tensor3<Scalar> forward(Context& ctx, const Tensor3<Scalar>& x, Cache& cache) const {
    return forward_from<0>(ctx, x, cache);
  }

  Tensor3<Scalar> backward(Context& ctx, const Tensor3<Scalar>& dy, const Cache& cache) {
    return backward_from<kSize - 1>(ctx, dy, cache);
  }

 private:
  template <std::size_t I>
  Tensor3<Scalar> forward_from(Context& ctx, const Tensor3<Scalar>& x, Cache& cache) const {
    Tensor3<Scalar> y = std::get<I>(layers_).forward(ctx, x, std::get<I>(cache.children));
    if constexpr (I + 1 < kSize)
      return forward_from<I + 1>(ctx, y, cache);
    else
      return y;
  }

  template <std::size_t I>
  Tensor3<Scalar> backward_from(Context& ctx, const Tensor3<Scalar>& dy, const Cache& cache) {
    Tensor3<Scalar> dx = std::get<I>(layers_).backward(ctx, dy, std::get<I>(cache.children));
    if constexpr (I > 0)
      return backward_from<I - 1>(ctx, dx, cache);
    else
      return dx;
  }

  template <std::size_t I, class V>
  void visit_from(V& v) {
    detail::visit_named(v, names_[I], std::get<I>(layers_));
    if constexpr (I + 1 < kSize) visit_from<I + 1>(v);
  }

  Layers layers_;
  std::array<std::string, kSize> names_ = detail::index_names<kSize>(std::make_index_sequence<kSize>{});
};

}  // namespace sma
