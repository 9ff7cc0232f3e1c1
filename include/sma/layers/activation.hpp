// sma/layers/activation.hpp: pointwise activations (SiLU, GELU, ReLU, ReLU^2), their derivatives, matrix helpers
// that other layers call on packed (rows, cols) matrices, and the elementwise layers Silu<T>, Gelu<T>, ...
//
// Derivations: docs/maths/linear_activation.md.
#pragma once

#include <sma/core/layer.hpp>
#include <sma/core/tensor.hpp>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace sma {

/// The pointwise nonlinearities the reference models use. `gelu` is the exact (erf) form, PyTorch's default;
/// `identity` is fairseq's "linear".
enum class Activation : std::uint8_t { silu, gelu, relu, relu2, identity };

inline const char* to_string(Activation a) {
  switch (a) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
    case Activation::relu2: return "relu2";
    case Activation::identity: return "identity";
  }
  return "?";
}

/// "silu" (also "swish"), "gelu", "relu", "relu2", "identity" (also "linear"); anything else throws ValueError.
inline Activation parse_activation(const std::string& s) {
  if (s == "silu" || s == "swish") return Activation::silu;
  if (s == "gelu") return Activation::gelu;
  if (s == "relu") return Activation::relu;
  if (s == "relu2") return Activation::relu2;
  if (s == "identity" || s == "linear") return Activation::identity;
  throw ValueError(str_cat("parse_activation: unknown activation '", s,
                           "' (expected silu, gelu, relu, relu2 or identity)"));
}

// ---- scalar functions and derivatives ----

namespace detail {
inline constexpr double kSqrtHalf = 0.70710678118654752440;   // 1 / sqrt(2)
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
// The scalar functions take only floating-point arguments, so that an Eigen matrix argument picks the matrix
// overloads below instead of deducing T = the Eigen type.
template <class T>
using EnableIfFloat = std::enable_if_t<std::is_floating_point<T>::value, int>;
}  // namespace detail

template <class T, detail::EnableIfFloat<T> = 0>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
/// silu(x) = x * sigmoid(x).
template <class T, detail::EnableIfFloat<T> = 0>
T silu(T x) {
  return x * sigmoid(x);
}
/// silu'(x) = s (1 + x (1 - s)), s = sigmoid(x).
template <class T, detail::EnableIfFloat<T> = 0>
T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}
/// gelu(x) = x Phi(x) = x/2 (1 + erf(x / sqrt 2)).
template <class T, detail::EnableIfFloat<T> = 0>
T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(detail::kSqrtHalf)));
}
/// gelu'(x) = Phi(x) + x phi(x).
template <class T, detail::EnableIfFloat<T> = 0>
T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(detail::kSqrtHalf)));
  const T pdf = std::exp(T(-0.5) * x * x) * T(detail::kInvSqrt2Pi);
  return cdf + x * pdf;
}
template <class T, detail::EnableIfFloat<T> = 0>
T relu(T x) {
  return x > T(0) ? x : T(0);
}
/// relu'(0) = 0, PyTorch's choice.
template <class T, detail::EnableIfFloat<T> = 0>
T relu_grad(T x) {
  return x > T(0) ? T(1) : T(0);
}
/// relu2(x) = relu(x)^2 (the reference's attention activation).
template <class T, detail::EnableIfFloat<T> = 0>
T relu2(T x) {
  return x > T(0) ? x * x : T(0);
}
template <class T, detail::EnableIfFloat<T> = 0>
T relu2_grad(T x) {
  return x > T(0) ? T(2) * x : T(0);
}

/// f(x) for the runtime-chosen activation.
template <class T, detail::EnableIfFloat<T> = 0>
T activate(Activation a, T x) {
  switch (a) {
    case Activation::silu: return silu(x);
    case Activation::gelu: return gelu(x);
    case Activation::relu: return relu(x);
    case Activation::relu2: return relu2(x);
    case Activation::identity: return x;
  }
  return x;
}
/// f'(x) for the runtime-chosen activation.
template <class T, detail::EnableIfFloat<T> = 0>
T activate_grad(Activation a, T x) {
  switch (a) {
    case Activation::silu: return silu_grad(x);
    case Activation::gelu: return gelu_grad(x);
    case Activation::relu: return relu_grad(x);
    case Activation::relu2: return relu2_grad(x);
    case Activation::identity: return T(1);
  }
  return T(1);
}

// ---- matrix helpers ----
//
// They take any writable Eigen dense object: a Matrix, a MatrixMap (as_matrix of a tensor), or a block such as the
// z/r/v column ranges of a projection. Work is vectorised with Eigen array expressions and split over row chunks
// with OpenMP when the matrix is large.

namespace detail {

/// Below this many elements the OpenMP fork costs more than it saves.
inline constexpr Index kElementwiseParallelMin = Index(1) << 16;

/// Calls f(first_row, n_rows) on row chunks, in parallel for large matrices.
template <class F>
void for_row_chunks(Index rows, Index cols, F&& f) {
  const Index total = rows * cols;
  if (total < kElementwiseParallelMin || rows < 2) {
    if (rows > 0) f(Index(0), rows);
    return;
  }
  const Index chunk = std::max<Index>(1, (Index(1) << 14) / std::max<Index>(1, cols));
  const Index n_chunks = (rows + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1)
  for (Index c = 0; c < n_chunks; ++c) {
    const Index r0 = c * chunk;
    f(r0, std::min(chunk, rows - r0));
  }
}

/// Eigen's documented idiom for writing through an expression passed as a const reference (maps and blocks are
/// temporaries, so they cannot bind to a non-const reference).
template <class Derived>
Eigen::MatrixBase<Derived>& writable(const Eigen::MatrixBase<Derived>& x) {
  return const_cast<Eigen::MatrixBase<Derived>&>(x);
}

/// y = f(x) on array blocks, vectorised.
template <class In, class Out>
void apply_activation(Activation a, const In& x, Out&& y) {
  using T = typename In::Scalar;
  switch (a) {
    case Activation::silu:
      y = x / (T(1) + (-x).exp());
      break;
    case Activation::gelu:
      y = T(0.5) * x * (T(1) + (x * T(detail::kSqrtHalf)).erf());
      break;
    case Activation::relu:
      y = x.max(T(0));
      break;
    case Activation::relu2:
      y = x.max(T(0)).square();
      break;
    case Activation::identity:
      y = x;
      break;
  }
}

/// g = g * f'(x) on array blocks, vectorised.
template <class In, class Out>
void apply_activation_grad(Activation a, const In& x, Out&& g) {
  using T = typename In::Scalar;
  switch (a) {
    case Activation::silu: {
      // s is materialised so exp runs once per element.
      const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> s = (T(1) + (-x).exp()).inverse();
      g = g * (s * (T(1) + x * (T(1) - s)));
      break;
    }
    case Activation::gelu:
      g = g * (T(0.5) * (T(1) + (x * T(detail::kSqrtHalf)).erf()) +
               x * (T(-0.5) * x.square()).exp() * T(detail::kInvSqrt2Pi));
      break;
    case Activation::relu:
      g = (x > T(0)).select(g, T(0));
      break;
    case Activation::relu2:
      g = (x > T(0)).select(T(2) * x * g, T(0));
      break;
    case Activation::identity:
      break;
  }
}

}  // namespace detail

/// x = f(x) in place, for any writable Eigen matrix, map or block.
template <class Derived>
void activation_inplace(Activation a, const Eigen::MatrixBase<Derived>& x_) {
  auto& x = detail::writable(x_);
  detail::for_row_chunks(x.rows(), x.cols(), [&](Index r0, Index n) {
    auto blk = x.middleRows(r0, n).array();
    detail::apply_activation(a, blk, blk);
  });
}

/// x = silu(x) in place.
template <class Derived>
void silu_inplace(const Eigen::MatrixBase<Derived>& x) {
  activation_inplace(Activation::silu, x);
}

/// Returns f(x) as a fresh matrix.
template <class Derived>
Matrix<typename Derived::Scalar> activation_forward(Activation a, const Eigen::MatrixBase<Derived>& x) {
  Matrix<typename Derived::Scalar> y(x.rows(), x.cols());
  detail::for_row_chunks(x.rows(), x.cols(), [&](Index r0, Index n) {
    detail::apply_activation(a, x.middleRows(r0, n).array(), y.middleRows(r0, n).array());
  });
  return y;
}

/// Matrix overloads of the scalar functions: a fresh matrix holding f(x) for any Eigen matrix, map or block.
template <class Derived>
Matrix<typename Derived::Scalar> silu(const Eigen::MatrixBase<Derived>& x) {
  return activation_forward(Activation::silu, x);
}
template <class Derived>
Matrix<typename Derived::Scalar> gelu(const Eigen::MatrixBase<Derived>& x) {
  return activation_forward(Activation::gelu, x);
}
template <class Derived>
Matrix<typename Derived::Scalar> relu(const Eigen::MatrixBase<Derived>& x) {
  return activation_forward(Activation::relu, x);
}
template <class Derived>
Matrix<typename Derived::Scalar> relu2(const Eigen::MatrixBase<Derived>& x) {
  return activation_forward(Activation::relu2, x);
}
template <class Derived>
Matrix<typename Derived::Scalar> sigmoid(const Eigen::MatrixBase<Derived>& x) {
  using T = typename Derived::Scalar;
  Matrix<T> y(x.rows(), x.cols());
  detail::for_row_chunks(x.rows(), x.cols(), [&](Index r0, Index n) {
    y.middleRows(r0, n).array() = (T(1) + (-x.middleRows(r0, n).array()).exp()).inverse();
  });
  return y;
}

/// g = g * f'(x) in place: turns dL/dy into dL/dx. `x` is the activation's INPUT.
template <class DerivedX, class DerivedG>
void activation_backward_inplace(Activation a, const Eigen::MatrixBase<DerivedX>& x,
                                 const Eigen::MatrixBase<DerivedG>& g_) {
  auto& g = detail::writable(g_);
  if (x.rows() != g.rows() || x.cols() != g.cols())
    throw ShapeError(str_cat("activation_backward(", to_string(a), "): x is (", x.rows(), ", ", x.cols(),
                             ") but the gradient is (", g.rows(), ", ", g.cols(), ")"));
  detail::for_row_chunks(x.rows(), x.cols(), [&](Index r0, Index n) {
    auto gb = g.middleRows(r0, n).array();
    detail::apply_activation_grad(a, x.middleRows(r0, n).array(), gb);
  });
}

/// Returns dx = dy * f'(x) as a fresh matrix. `x` is the activation's INPUT.
template <class DerivedX, class DerivedG>
Matrix<typename DerivedX::Scalar> activation_backward(Activation a, const Eigen::MatrixBase<DerivedX>& x,
                                                      const Eigen::MatrixBase<DerivedG>& dy) {
  Matrix<typename DerivedX::Scalar> dx = dy;
  activation_backward_inplace(a, x, dx);
  return dx;
}

/// dx = dy * silu'(x), x the input of the SiLU.
template <class DerivedX, class DerivedG>
Matrix<typename DerivedX::Scalar> silu_backward(const Eigen::MatrixBase<DerivedX>& x,
                                                const Eigen::MatrixBase<DerivedG>& dy) {
  return activation_backward(Activation::silu, x, dy);
}

/// dy = dy * silu'(x) in place.
template <class DerivedX, class DerivedG>
void silu_backward_inplace(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedG>& dy) {
  activation_backward_inplace(Activation::silu, x, dy);
}

// ---- elementwise layers ----

/// ActivationLayer<T, A, D>: y = f(x) elementwise, f fixed at compile time.
///
/// SHAPES    x (B, L, D) -> y (B, L, D); D any width unless fixed by the template argument.
/// PARAMS    none.
/// CACHE     the input x (every derivative here is a function of x).
/// GRADIENTS backward returns dx = dy * f'(x); nothing to accumulate.
template <class T, Activation A, Index D = Dynamic>
class ActivationLayer {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  static constexpr Activation kActivation = A;
  struct Config {};
  struct Cache {
    Tensor3<T> x;  // (B, L, D)
  };

  ActivationLayer() = default;
  explicit ActivationLayer(const Config&) {}

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, D}, str_cat(to_string(A), "::forward: x"));
    if (ctx.check_finite) check_finite(x, str_cat(to_string(A), "::forward: x"));
    Tensor3<T> y = uninitialized<T, 3>(x.dimensions());
    const CMatrixMap<T> xm = as_matrix(x);
    MatrixMap<T> ym = as_matrix(y);
    detail::for_row_chunks(xm.rows(), xm.cols(), [&](Index r0, Index n) {
      detail::apply_activation(A, xm.middleRows(r0, n).array(), ym.middleRows(r0, n).array());
    });
    cache.x = x;
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.x.dimension(0), cache.x.dimension(1), cache.x.dimension(2)},
                str_cat(to_string(A), "::backward: dy"));
    Tensor3<T> dx = dy;
    activation_backward_inplace(A, as_matrix(cache.x), as_matrix(dx));
    return dx;
  }

  template <class V>
  void visit_params(V&&) {}
};

template <class T, Index D = Dynamic>
using Silu = ActivationLayer<T, Activation::silu, D>;
template <class T, Index D = Dynamic>
using Gelu = ActivationLayer<T, Activation::gelu, D>;
template <class T, Index D = Dynamic>
using Relu = ActivationLayer<T, Activation::relu, D>;
template <class T, Index D = Dynamic>
using Relu2 = ActivationLayer<T, Activation::relu2, D>;

}  // namespace sma
