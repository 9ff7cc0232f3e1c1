// sma/core/tensor.hpp: tensor aliases on Eigen and the one public layout.
//
// LAYOUT (stated once for the whole library): every tensor is row-major (C order, last index fastest).
// Sequences are batch-first, (B, L, D): batch, position, channel. Masks are (B, L). Weights keep PyTorch's layout,
// so a Linear weight is (out, in) and y = x W^T + b. The golden files and the reference are time-major (L, B, D);
// sma::io converts at the boundary.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

namespace sma {

template <class T, int R>
using Tensor = Eigen::Tensor<T, R, Eigen::RowMajor, Index>;
template <class T>
using Tensor1 = Tensor<T, 1>;
template <class T>
using Tensor2 = Tensor<T, 2>;
template <class T>
using Tensor3 = Tensor<T, 3>;
template <class T>
using Tensor4 = Tensor<T, 4>;

/// Non-owning views (Eigen::TensorMap) over row-major data.
template <class T, int R>
using View = Eigen::TensorMap<Tensor<T, R>>;
template <class T, int R>
using CView = Eigen::TensorMap<const Tensor<T, R>>;
template <class T>
using View3 = View<T, 3>;
template <class T>
using CView3 = CView<T, 3>;

/// Padding mask, (B, L): 1 marks a padded position, 0 a real token (the reference's convention).
using Mask = Tensor2<std::uint8_t>;

/// Row-major dense matrices, and maps over raw memory, for the GEMM-shaped work.
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using MatrixMap = Eigen::Map<Matrix<T>>;
template <class T>
using CMatrixMap = Eigen::Map<const Matrix<T>>;
template <class T>
using VectorMap = Eigen::Map<Vector<T>>;
template <class T>
using CVectorMap = Eigen::Map<const Vector<T>>;

/// A (B, L, D) tensor seen as a (B*L, D) matrix, without a copy.
template <class T>
MatrixMap<T> as_matrix(Tensor3<T>& t) {
  return MatrixMap<T>(t.data(), t.dimension(0) * t.dimension(1), t.dimension(2));
}
template <class T>
CMatrixMap<T> as_matrix(const Tensor3<T>& t) {
  return CMatrixMap<T>(t.data(), t.dimension(0) * t.dimension(1), t.dimension(2));
}
template <class T>
MatrixMap<T> as_matrix(Tensor2<T>& t) {
  return MatrixMap<T>(t.data(), t.dimension(0), t.dimension(1));
}
template <class T>
CMatrixMap<T> as_matrix(const Tensor2<T>& t) {
  return CMatrixMap<T>(t.data(), t.dimension(0), t.dimension(1));
}

/// A dense matrix seen through a map (so functions taking maps accept owned matrices without a copy).
template <class T>
CMatrixMap<T> cmap(const Matrix<T>& m) {
  return CMatrixMap<T>(m.data(), m.rows(), m.cols());
}
template <class T>
MatrixMap<T> map(Matrix<T>& m) {
  return MatrixMap<T>(m.data(), m.rows(), m.cols());
}

/// Dimensions of a tensor as a std::array (for messages and comparisons).
template <class TensorLike>
auto dims_of(const TensorLike& t) {
  std::array<Index, TensorLike::NumDimensions> d{};
  for (int i = 0; i < TensorLike::NumDimensions; ++i) d[i] = t.dimension(i);
  return d;
}

/// Throws ShapeError unless `t` has exactly the extents in `expected`; an expected extent of -1 matches anything.
/// `where` names the argument, e.g. "SeqBoatLayer::forward: x".
template <class TensorLike>
void check_shape(const TensorLike& t, std::initializer_list<Index> expected, const std::string& where) {
  constexpr int R = TensorLike::NumDimensions;
  bool ok = static_cast<int>(expected.size()) == R;
  if (ok) {
    int i = 0;
    for (Index e : expected) {
      if (e >= 0 && t.dimension(i) != e) ok = false;
      ++i;
    }
  }
  if (!ok) {
    std::string exp = "(";
    int i = 0;
    for (Index e : expected) {
      if (i++) exp += ", ";
      exp += e >= 0 ? std::to_string(e) : std::string("*");
    }
    exp += ")";
    throw ShapeError(str_cat(where, ": expected shape ", exp, ", got ", shape_string(dims_of(t))));
  }
}

/// Throws NumericError naming the first non-finite element of `t` and its flat index.
template <class TensorLike>
void check_finite(const TensorLike& t, const std::string& where) {
  for (Index i = 0; i < t.size(); ++i) {
    if (!std::isfinite(static_cast<double>(t.data()[i]))) {
      throw NumericError(str_cat(where, ": non-finite value ", t.data()[i], " at flat index ", i, " of shape ",
                                 shape_string(dims_of(t))));
    }
  }
}

/// A tensor whose every element the caller promises to write. Builds with SMA_POISON_UNINITIALIZED (the test
/// suite's) fill it with NaN, so an element that is never written shows up in the gradient checks.
template <class T, int R>
Tensor<T, R> uninitialized(const std::array<Index, R>& d) {
  Tensor<T, R> t(d);
#ifdef SMA_POISON_UNINITIALIZED
  if constexpr (std::is_floating_point<T>::value) t.setConstant(std::numeric_limits<T>::quiet_NaN());
#endif
  return t;
}

/// A tensor of the given extents filled with zeros.
template <class T, int R>
Tensor<T, R> zeros(const std::array<Index, R>& d) {
  Tensor<T, R> t(d);
  t.setZero();
  return t;
}

}  // namespace sma
