// sma/layers/linear.hpp: the affine map y = x W^T + b (PyTorch's nn.Linear), as a layer on (B, L, in) tensors and
// as row-matrix functions that other layers (GAU, SeqBoat) call on packed token matrices.
//
// Derivation of the backward pass: docs/maths/linear_activation.md.
#pragma once

#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sma {

/// How `Linear::reset_parameters` draws the weight.
///  - `normal`: the reference's `Normal`: N(0, std^2) truncated to [-2 std, 2 std], std = 0.02; bias 0.
///  - `kaiming_uniform`: PyTorch's nn.Linear default: W and b ~ U(-1/sqrt(in), 1/sqrt(in)).
enum class LinearInit : std::uint8_t { normal, kaiming_uniform };

namespace detail {

/// One draw of N(0, std^2) truncated to [-2 std, 2 std], by rejection (accepts about 95% of draws). Same
/// distribution as torch.nn.init.trunc_normal_(t, 0, std, -2 std, 2 std); the numbers themselves differ.
template <class Rng>
double truncated_normal(Rng& rng, double std) {
  std::normal_distribution<double> n(0.0, 1.0);
  for (;;) {
    const double z = n(rng);
    if (z >= -2.0 && z <= 2.0) return z * std;
  }
}

/// Threads for a weight gradient over S tokens: 1 unless the product is big enough to pay for a fork, and never
/// more than one per 64 tokens. Inside an enclosing parallel region: 1.
inline int weight_grad_threads(Index S, Index in, Index out) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  const double flops = 2.0 * double(S) * double(in) * double(out);
  if (flops < 8e6) return 1;
  return static_cast<int>(std::max<Index>(1, std::min<Index>(omp_get_max_threads(), S / 64)));
#else
  (void)S, (void)in, (void)out;
  return 1;
#endif
}

/// Rows per task of the row-parallel products. Fixed, so that every row's result (Eigen's blocking, hence its
/// rounding, depends on the product's size) is the same whatever the number of threads.
inline constexpr Index kRowBlock = 256;

/// Calls f(first_row, n_rows) on consecutive blocks of kRowBlock rows; in parallel when there are several blocks
/// and `flops` of work, never inside an enclosing parallel region. Blocks are handed out one at a time, so a
/// thread that the OS preempts (a shared machine) holds up one block, not a fixed share. Eigen runs each block's
/// products single-threaded (its own threading would nest and change the blocking).
template <class F>
void for_row_blocks(Index rows, double flops, F&& f) {
  const Index n_blocks = (rows + kRowBlock - 1) / kRowBlock;
#ifdef _OPENMP
  const int nt = (n_blocks > 1 && flops > 4e6 && !omp_in_parallel())
                     ? static_cast<int>(std::min<Index>(omp_get_max_threads(), n_blocks))
                     : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (Index blk = 0; blk < n_blocks; ++blk) {
    omp_set_num_threads(1);  // this task's own copy: Eigen sees one thread
    const Index r0 = blk * kRowBlock;
    f(r0, std::min(kRowBlock, rows - r0));
  }
#else
  (void)flops;
  for (Index blk = 0; blk < n_blocks; ++blk) {
    const Index r0 = blk * kRowBlock;
    f(r0, std::min(kRowBlock, rows - r0));
  }
#endif
}

}  // namespace detail

/// Fills `p` with the reference's `Normal(p, 0, std)`: truncated normal on [-2 std, 2 std].
template <class T>
void init_truncated_normal(Param<T>& p, std::uint64_t seed, double std = 0.02) {
  std::mt19937_64 rng(seed);
  for (Index i = 0; i < p.size(); ++i) p.data()[i] = static_cast<T>(detail::truncated_normal(rng, std));
}

/// Linear<T, In, Out>: y = x W^T + b, PyTorch's nn.Linear.
///
/// SHAPES    x (B, L, in) -> y (B, L, out). The row functions take any (S, in) matrix (S packed tokens).
/// PARAMS    weight (out, in), bias (out) [absent when Config::bias is false]. PyTorch layout and names.
///           Init: reset_parameters(seed) -> truncated normal std 0.02, zero bias (the reference's Normal);
///           LinearInit::kaiming_uniform gives PyTorch's default instead.
/// WIDTHS    In/Out fix the widths at compile time (kInDim, kOutDim); the Config must then agree (ShapeError).
/// CACHE     the input x, which dW needs.
/// GRADIENTS backward returns dx = dy W and ADDS dW += dy^T x, db += sum over rows of dy.
template <class T, Index In = Dynamic, Index Out = Dynamic>
class Linear {
 public:
  using Scalar = T;
  static constexpr Index kInDim = In, kOutDim = Out;

  struct Config {
    Index in = In;      ///< input width (must be given when In is Dynamic)
    Index out = Out;    ///< output width (must be given when Out is Dynamic)
    bool bias = true;   ///< add a learned bias
  };
  struct Cache {
    Tensor3<T> x;  // (B, L, in)
  };

  /// A 0-by-0 layer, only useful as a placeholder to assign to; widths fixed by the template are honoured.
  Linear() : Linear(Config{In == Dynamic ? 0 : In, Out == Dynamic ? 0 : Out, true}) {}

  /// Builds the layer and initialises it with reset_parameters(seed, init).
  explicit Linear(const Config& cfg, std::uint64_t seed = 0, LinearInit init = LinearInit::normal)
      : cfg_(validated(cfg)), weight_("weight", {cfg_.out, cfg_.in}), bias_("bias", {cfg_.bias ? cfg_.out : Index(0)}) {
    reset_parameters(seed, init);
  }

  const Config& config() const { return cfg_; }
  Index in_features() const { return cfg_.in; }
  Index out_features() const { return cfg_.out; }
  bool has_bias() const { return cfg_.bias; }

  Param<T>& weight() { return weight_; }
  const Param<T>& weight() const { return weight_; }
  Param<T>& bias() { return bias_; }
  const Param<T>& bias() const { return bias_; }

  /// Re-draws the parameters (see LinearInit). Gradients are left alone.
  void reset_parameters(std::uint64_t seed, LinearInit init = LinearInit::normal) {
    if (init == LinearInit::normal) {
      init_truncated_normal(weight_, seed, 0.02);
      bias_.fill(T(0));
    } else {
      std::mt19937_64 rng(seed);
      const double bound = cfg_.in > 0 ? 1.0 / std::sqrt(double(cfg_.in)) : 0.0;
      std::uniform_real_distribution<double> u(-bound, bound);
      for (Index i = 0; i < weight_.size(); ++i) weight_.data()[i] = static_cast<T>(u(rng));
      for (Index i = 0; i < bias_.size(); ++i) bias_.data()[i] = static_cast<T>(u(rng));
    }
  }

  template <class V>
  void visit_params(V&& v) {
    v("weight", weight_);
    if (cfg_.bias) v("bias", bias_);
  }

  // ---- layer interface on (B, L, D) tensors ----

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, cfg_.in}, "Linear::forward: x");
    if (ctx.check_finite) check_finite(x, "Linear::forward: x");
    Tensor3<T> y = uninitialized<T, 3>({x.dimension(0), x.dimension(1), cfg_.out});
    forward_rows_into(as_matrix(x), as_matrix(y));
    cache.x = x;
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.x.dimension(0), cache.x.dimension(1), cfg_.out}, "Linear::backward: dy");
    Tensor3<T> dx = uninitialized<T, 3>({dy.dimension(0), dy.dimension(1), cfg_.in});
    accumulate_param_grads(as_matrix(cache.x), as_matrix(dy));
    backward_input_into(as_matrix(dy), as_matrix(dx));
    return dx;
  }

  // ---- row-matrix interface: x is (S, in), one token per row ----
  //
  // Inputs are Eigen::Ref, so a MatrixMap, a Matrix or a column block of a row-major matrix binds without a copy;
  // outputs ("_into") take any writable Eigen matrix, map or block of the right shape.

  using ConstRef = Eigen::Ref<const Matrix<T>>;

  /// y = x W^T + b, (S, in) -> (S, out).
  Matrix<T> forward_rows(const ConstRef& x) const {
    Matrix<T> y(x.rows(), cfg_.out);
    forward_rows_into(x, y);
    return y;
  }

  /// y = x W^T + b written into caller-provided storage of shape (S, out): a Matrix, a map or a block.
  template <class Derived>
  void forward_rows_into(const ConstRef& x, const Eigen::MatrixBase<Derived>& y_) const {
    auto& y = const_cast<Eigen::MatrixBase<Derived>&>(y_);  // Eigen's idiom for writable temporaries
    check_rows(x, cfg_.in, "Linear::forward_rows: x");
    check_rows(y, cfg_.out, "Linear::forward_rows: y");
    if (y.rows() != x.rows())
      throw ShapeError(str_cat("Linear::forward_rows: y has ", y.rows(), " rows but x has ", x.rows()));
    const auto W = weight_.mat();
    const auto b = bias_.mat().row(0);
    detail::for_row_blocks(x.rows(), 2.0 * double(x.rows()) * double(cfg_.in) * double(cfg_.out), [&](Index r0, Index n) {
      auto yb = y.middleRows(r0, n);
      yb.noalias() = x.middleRows(r0, n) * W.transpose();
      if (cfg_.bias) yb.rowwise() += b;
    });
  }

  /// Accumulates dW += dy^T x and db += colsum(dy); returns dx = dy W, (S, in).
  Matrix<T> backward_rows(const ConstRef& x, const ConstRef& dy) {
    accumulate_param_grads(x, dy);
    Matrix<T> dx(dy.rows(), cfg_.in);
    backward_input_into(dy, dx);
    return dx;
  }

  /// Accumulates dW and db only (when the input needs no gradient).
  void accumulate_param_grads(const ConstRef& x, const ConstRef& dy) {
    check_rows(x, cfg_.in, "Linear::backward_rows: x");
    check_rows(dy, cfg_.out, "Linear::backward_rows: dy");
    if (dy.rows() != x.rows())
      throw ShapeError(str_cat("Linear::backward_rows: dy has ", dy.rows(), " rows but x has ", x.rows()));
    const Index S = x.rows();
    if (S == 0) return;
    if (cfg_.bias) bias_.grad_mat().row(0).noalias() += dy.colwise().sum();
    // dW = dy^T x is a product whose inner dimension (the S tokens) is the long one. Eigen's parallel GEMM splits
    // the small (out, in) result and synchronises its threads once per depth block, which stalls badly when a core
    // is shared; splitting the tokens instead gives each thread an independent product and one final sum.
    const int n_threads = detail::weight_grad_threads(S, cfg_.in, cfg_.out);
    if (n_threads <= 1) {
      weight_.grad_mat().noalias() += dy.transpose() * x;
      return;
    }
    std::vector<Matrix<T>> partial(static_cast<std::size_t>(n_threads - 1));
    MatrixMap<T> dW = weight_.grad_mat();
#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num();
#else
      const int t = 0;
#endif
      const Index r0 = S * t / n_threads, r1 = S * (t + 1) / n_threads;
      if (t == 0) {
        dW.noalias() += dy.middleRows(r0, r1 - r0).transpose() * x.middleRows(r0, r1 - r0);
      } else {
        Matrix<T>& p = partial[static_cast<std::size_t>(t - 1)];
        p.noalias() = dy.middleRows(r0, r1 - r0).transpose() * x.middleRows(r0, r1 - r0);
      }
    }
    for (const Matrix<T>& p : partial) dW += p;
  }

  /// dx = dy W, (S, out) -> (S, in), written into caller-provided storage: a Matrix, a map or a block.
  template <class Derived>
  void backward_input_into(const ConstRef& dy, const Eigen::MatrixBase<Derived>& dx_) const {
    auto& dx = const_cast<Eigen::MatrixBase<Derived>&>(dx_);
    check_rows(dy, cfg_.out, "Linear::backward_rows: dy");
    check_rows(dx, cfg_.in, "Linear::backward_rows: dx");
    if (dx.rows() != dy.rows())
      throw ShapeError(str_cat("Linear::backward_rows: dx has ", dx.rows(), " rows but dy has ", dy.rows()));
    const auto W = weight_.mat();
    detail::for_row_blocks(dy.rows(), 2.0 * double(dy.rows()) * double(cfg_.in) * double(cfg_.out), [&](Index r0, Index n) {
      dx.middleRows(r0, n).noalias() = dy.middleRows(r0, n) * W;
    });
  }

  /// dx = dy W as a fresh matrix.
  Matrix<T> backward_input(const ConstRef& dy) const {
    Matrix<T> dx(dy.rows(), cfg_.in);
    backward_input_into(dy, dx);
    return dx;
  }

 private:
  static Config validated(const Config& cfg) {
    if (cfg.in < 0 || cfg.out < 0)
      throw ValueError(str_cat("Linear: widths must be given (in = ", cfg.in, ", out = ", cfg.out, ")"));
    checked_width(In, cfg.in, "Linear: in");
    checked_width(Out, cfg.out, "Linear: out");
    return cfg;
  }

  template <class M>
  static void check_rows(const M& m, Index cols, const char* where) {
    if (m.cols() != cols)
      throw ShapeError(str_cat(where, ": expected shape (*, ", cols, "), got (", m.rows(), ", ", m.cols(), ")"));
  }

  Config cfg_;
  Param<T> weight_;  // (out, in)
  Param<T> bias_;    // (out), or (0) without bias
};

}  // namespace sma
