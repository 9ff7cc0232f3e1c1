// sma/core/layer.hpp: the layer contract (docs/layer_contract.md), checked at compile time with one readable
// message per missing requirement.
//
// A layer L provides:
//   using Scalar = T;                      float or double
//   struct Cache { ... };                  what forward saves for backward (default-constructible)
//   Tensor3<T> forward(Context&, const Tensor3<T>& x, Cache&) const;      (B, L, in) -> (B, L, out)
//   Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache&);    returns dx; ADDS parameter gradients
//   template <class V> void visit_params(V&& v);                          v(name, Param<T>&) per parameter
//   static constexpr Index kInDim, kOutDim;                               Dynamic unless fixed at compile time
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <string>
#include <type_traits>
#include <utility>

namespace sma {

namespace detail {

template <class...>
using void_t = void;

template <class L, class = void>
struct has_scalar : std::false_type {};
template <class L>
struct has_scalar<L, void_t<typename L::Scalar>> : std::true_type {};

template <class L, class = void>
struct has_cache : std::false_type {};
template <class L>
struct has_cache<L, void_t<typename L::Cache>> : std::true_type {};

template <class L, class = void>
struct has_forward : std::false_type {};
template <class L>
struct has_forward<L, void_t<decltype(std::declval<const L&>().forward(
                          std::declval<Context&>(), std::declval<const Tensor3<typename L::Scalar>&>(),
                          std::declval<typename L::Cache&>()))>>
    : std::is_same<decltype(std::declval<const L&>().forward(std::declval<Context&>(),
                                                             std::declval<const Tensor3<typename L::Scalar>&>(),
                                                             std::declval<typename L::Cache&>())),
                   Tensor3<typename L::Scalar>> {};

template <class L, class = void>
struct has_backward : std::false_type {};
template <class L>
struct has_backward<L, void_t<decltype(std::declval<L&>().backward(
                           std::declval<Context&>(), std::declval<const Tensor3<typename L::Scalar>&>(),
                           std::declval<const typename L::Cache&>()))>>
    : std::is_same<decltype(std::declval<L&>().backward(std::declval<Context&>(),
                                                        std::declval<const Tensor3<typename L::Scalar>&>(),
                                                        std::declval<const typename L::Cache&>())),
                   Tensor3<typename L::Scalar>> {};

template <class T>
struct NullVisitor {
  void operator()(const std::string&, Param<T>&) const {}
};

template <class L, class = void>
struct has_visit_params : std::false_type {};
template <class L>
struct has_visit_params<L, void_t<decltype(std::declval<L&>().visit_params(
                               std::declval<NullVisitor<typename L::Scalar>&>()))>> : std::true_type {};

template <class L, class = void>
struct has_dims : std::false_type {};
template <class L>
struct has_dims<L, void_t<decltype(L::kInDim), decltype(L::kOutDim)>> : std::true_type {};

}  // namespace detail

/// Compile-time check of the layer contract. Each requirement has its own static_assert, so the first error line
/// says exactly what to add. Returns true so it can be folded: `static_assert((check_layer<Ls>() && ...));`.
template <class L>
constexpr bool check_layer() {
  // If one of these fires, the type named in the instantiation does not meet docs/layer_contract.md.
  static_assert(detail::has_scalar<L>::value, "sma: a layer must define 'using Scalar = float or double;' (docs/layer_contract.md)");
  static_assert(detail::has_cache<L>::value, "sma: a layer must define a nested 'struct Cache' holding what backward needs (docs/layer_contract.md)");
  static_assert(detail::has_dims<L>::value, "sma: a layer must define 'static constexpr Index kInDim, kOutDim' (Dynamic if runtime) (docs/layer_contract.md)");
  static_assert(detail::has_forward<L>::value, "sma: a layer must define 'Tensor3<Scalar> forward(Context&, const Tensor3<Scalar>&, Cache&) const' (docs/layer_contract.md#forward)");
  static_assert(detail::has_backward<L>::value, "sma: a layer must define 'Tensor3<Scalar> backward(Context&, const Tensor3<Scalar>& dy, const Cache&)' returning dx (docs/layer_contract.md#backward)");
  static_assert(detail::has_visit_params<L>::value, "sma: a layer must define 'template <class V> void visit_params(V&& v)' calling v(name, Param<Scalar>&) (docs/layer_contract.md#parameters)");
  return true;
}

/// True when `L` meets the layer contract (no diagnostics; use check_layer<L>() for those).
template <class L>
inline constexpr bool is_layer_v = detail::has_scalar<L>::value && detail::has_cache<L>::value &&
                                   detail::has_dims<L>::value && detail::has_forward<L>::value &&
                                   detail::has_backward<L>::value && detail::has_visit_params<L>::value;

#if SMA_HAS_CONCEPTS
/// C++20: the same contract as a concept, so misuse fails at the template boundary.
template <class L>
concept Layer = is_layer_v<L>;
#endif

namespace detail {

/// Holds the message with the numbers in the instantiation name: the compiler prints
/// `assert_widths_match<256, 128, 2>` next to it.
template <Index Out, Index In, Index I>
constexpr bool assert_widths_match() {
  static_assert(Out == Dynamic || In == Dynamic || Out == In,
                "sma::Seq: kOutDim of layer I must equal kInDim of layer I+1 (see the numbers in this instantiation)");
  return true;
}

template <class A, class B, Index I>
constexpr bool assert_scalars_match() {
  static_assert(std::is_same<typename A::Scalar, typename B::Scalar>::value,
                "sma::Seq: all layers must use the same Scalar type (float or double)");
  return true;
}

}  // namespace detail

/// Fixed width if `Fixed != Dynamic` and the runtime value disagrees: throws ShapeError naming `what`.
inline Index checked_width(Index fixed, Index runtime, const char* what) {
  if (fixed != Dynamic && runtime != fixed)
    throw ShapeError(str_cat(what, ": compile-time width is ", fixed, " but the configuration says ", runtime));
  return runtime;
}

}  // namespace sma
