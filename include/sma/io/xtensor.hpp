// sma/io/xtensor.hpp: interop between xtensor arrays and sma tensors (copies both ways, a zero-copy view), and .npy
// files shared with xtensor's xt::load_npy / xt::dump_npy.
//
// The whole header is empty unless SMA_WITH_XTENSOR is defined (CMake option SMA_WITH_XTENSOR, on by default, adds
// the definition and links xtensor). xtensor 0.24 must be compiled as C++17: under g++ 12 -std=c++20 it silently
// miscomputes (docs/io.md).
#pragma once

#ifdef SMA_WITH_XTENSOR

#include <sma/core/error.hpp>
#include <sma/core/tensor.hpp>
#include <sma/io/npy.hpp>

#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>

#include <array>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace sma {
namespace io {

/// A row-major xtensor view over an sma tensor's memory (no copy; valid while the tensor lives and keeps its size).
template <class T, int R>
using XView = decltype(xt::adapt(std::declval<T*>(), std::size_t{}, xt::no_ownership(),
                                 std::declval<std::array<std::size_t, static_cast<std::size_t>(R)>>()));

/// Zero-copy view of `t` as an xtensor expression: writes through the view change `t`.
template <class T, int R>
XView<T, R> xview(Tensor<T, R>& t);
/// Read-only zero-copy view.
template <class T, int R>
XView<const T, R> xview(const Tensor<T, R>& t);

/// Copies `t` into an xt::xtensor of the same rank.
template <class T, int R>
xt::xtensor<T, static_cast<std::size_t>(R)> to_xtensor(const Tensor<T, R>& t);
/// Copies `t` into an xt::xarray (dynamic rank).
template <class T, int R>
xt::xarray<T> to_xarray(const Tensor<T, R>& t);

/// Copies any xtensor expression (any layout, evaluated if lazy) into a rank-R sma tensor of its value type.
/// Throws ShapeError when the expression's rank is not R.
template <int R, class E>
Tensor<typename E::value_type, R> from_xtensor(const xt::xexpression<E>& e);

/// Saves an xtensor expression as .npy with sma's writer (atomic; dtype from the value type).
template <class E>
void save_npy(const std::string& path, const xt::xexpression<E>& e, const AtomicWriteOptions& options = {});
/// Loads a .npy file (sma's validating reader, any supported dtype converted to T) as an xt::xarray<T>.
template <class T>
xt::xarray<T> load_npy_xarray(const std::string& path);

// ---- implementation ----

namespace detail {

template <class Dims>
auto to_xshape(const Dims& d) {
  std::array<std::size_t, std::tuple_size<Dims>::value> s{};
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<std::size_t>(d[i]);
  return s;
}

}  // namespace detail

template <class T, int R>
XView<T, R> xview(Tensor<T, R>& t) {
  return xt::adapt(t.data(), static_cast<std::size_t>(t.size()), xt::no_ownership(), detail::to_xshape(dims_of(t)));
}

template <class T, int R>
XView<const T, R> xview(const Tensor<T, R>& t) {
  return xt::adapt(t.data(), static_cast<std::size_t>(t.size()), xt::no_ownership(), detail::to_xshape(dims_of(t)));
}

template <class T, int R>
xt::xtensor<T, static_cast<std::size_t>(R)> to_xtensor(const Tensor<T, R>& t) {
  return xt::xtensor<T, static_cast<std::size_t>(R)>(xview(t));
}

template <class T, int R>
xt::xarray<T> to_xarray(const Tensor<T, R>& t) {
  return xt::xarray<T>(xview(t));
}

template <int R, class E>
Tensor<typename E::value_type, R> from_xtensor(const xt::xexpression<E>& e) {
  using T = typename E::value_type;
  const E& x = e.derived_cast();
  if (x.dimension() != static_cast<std::size_t>(R)) {
    std::vector<std::size_t> s(x.shape().begin(), x.shape().end());
    throw ShapeError(str_cat("from_xtensor: expected rank ", R, ", got shape ", shape_string(s)));
  }
  std::array<Index, R> d{};
  for (int i = 0; i < R; ++i) d[static_cast<std::size_t>(i)] = static_cast<Index>(x.shape()[static_cast<std::size_t>(i)]);
  Tensor<T, R> t(d);
  xview(t) = x;  // the assignment walks any layout into the row-major target
  return t;
}

template <class E>
void save_npy(const std::string& path, const xt::xexpression<E>& e, const AtomicWriteOptions& options) {
  using T = typename E::value_type;
  const xt::xarray<T, xt::layout_type::row_major> a = e.derived_cast();
  std::vector<Index> shape(a.shape().begin(), a.shape().end());
  save_npy(path, a.data(), shape, dtype_of<T>, options);
}

template <class T>
xt::xarray<T> load_npy_xarray(const std::string& path) {
  const NpyArray a = read_npy(path);
  std::vector<std::size_t> shape(a.shape.begin(), a.shape.end());
  xt::xarray<T> out(shape);
  decode_elements(a.dtype, a.bytes.data(), out.size(), out.data(), path);
  return out;
}

}  // namespace io
}  // namespace sma

#endif  // SMA_WITH_XTENSOR
