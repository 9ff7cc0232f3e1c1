// sma/layers/norm.hpp: the normalisations of the reference models (LayerNorm, BatchNorm, ScaleNorm, RMSNorm) and
// SequenceNorm, the wrapper that picks one at run time and names its parameters as fairseq's SequenceNorm does.
//
// Derivations of every backward pass: docs/maths/norms.md.
#pragma once

#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/layers/activation.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace sma {

/// Which normalisation a SequenceNorm holds (fairseq's `norm_type` strings).
enum class NormType : std::uint8_t { layernorm, batchnorm, scalenorm, rmsnorm };

inline const char* to_string(NormType t) {
  switch (t) {
    case NormType::layernorm: return "layernorm";
    case NormType::batchnorm: return "batchnorm";
    case NormType::scalenorm: return "scalenorm";
    case NormType::rmsnorm: return "rmsnorm";
  }
  return "?";
}

/// "layernorm", "batchnorm", "scalenorm", "rmsnorm"; anything else throws ValueError naming the string.
inline NormType parse_norm_type(const std::string& s) {
  if (s == "layernorm") return NormType::layernorm;
  if (s == "batchnorm") return NormType::batchnorm;
  if (s == "scalenorm") return NormType::scalenorm;
  if (s == "rmsnorm") return NormType::rmsnorm;
  throw ValueError(str_cat("parse_norm_type: unknown norm type '", s,
                           "' (expected layernorm, batchnorm, scalenorm or rmsnorm)"));
}

namespace detail {

inline Index validated_norm_dim(Index fixed, Index dim, const char* who) {
  if (dim < 0) throw ValueError(str_cat(who, ": the width must be given (dim = ", dim, ")"));
  return checked_width(fixed, dim, who);
}

inline void require_positive_dim(Index dim, const char* who) {
  if (dim <= 0) throw ValueError(str_cat(who, ": the layer has width ", dim, " (default-constructed?)"));
}

/// Shared by RMSNorm and ScaleNorm: xhat = x r, r = 1/sqrt(mean(x^2) + eps), y = xhat * w where w is a
/// per-channel row (`scalar_w` false), a single number (`scalar_w` true), or absent (w == nullptr).
template <class T>
void rms_forward(const CMatrixMap<T>& X, const T* w, bool scalar_w, T eps, Matrix<T>& xhat, Vector<T>& r,
                 MatrixMap<T>& Y) {
  const Index S = X.rows(), D = X.cols();
  xhat.resize(S, D);
  r.resize(S);
  for_row_chunks(S, D, [&](Index r0, Index n) {
    for (Index i = r0; i < r0 + n; ++i) {
      const T ri = T(1) / std::sqrt(X.row(i).squaredNorm() / T(D) + eps);
      r(i) = ri;
      xhat.row(i) = X.row(i) * ri;
      if (!w)
        Y.row(i) = xhat.row(i);
      else if (scalar_w)
        Y.row(i) = xhat.row(i) * w[0];
      else
        Y.row(i).array() = xhat.row(i).array() * CMatrixMap<T>(w, 1, D).array();
    }
  });
}

/// dx = r (g - xhat mean(g xhat)), g = dy * w. Parameter gradients are the caller's.
template <class T>
void rms_backward(const Matrix<T>& xhat, const Vector<T>& r, const T* w, bool scalar_w, const CMatrixMap<T>& dY,
                  MatrixMap<T>& dX) {
  const Index S = xhat.rows(), D = xhat.cols();
  for_row_chunks(S, D, [&](Index r0, Index n) {
    for (Index i = r0; i < r0 + n; ++i) {
      auto g = dX.row(i).array();
      if (!w)
        g = dY.row(i).array();
      else if (scalar_w)
        g = dY.row(i).array() * w[0];
      else
        g = dY.row(i).array() * CMatrixMap<T>(w, 1, D).array();
      const T m = (g * xhat.row(i).array()).sum() / T(D);
      g = (g - xhat.row(i).array() * m) * r(i);
    }
  });
}

}  // namespace detail

// =====================================================================================================================

/// LayerNorm<T, D>: normalises each token over its D channels, PyTorch's nn.LayerNorm(D, eps, elementwise_affine).
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// MATHS     y = (x - mean) / sqrt(var + eps) * weight + bias, mean and biased var over D, per token.
/// PARAMS    weight (D) = 1, bias (D) = 0; both absent when Config::affine is false.
/// PADDING   per token, so padded positions cannot influence real ones.
/// CACHE     xhat (B*L, D) and 1/sqrt(var + eps) (B*L).
/// GRADIENTS backward returns dx and ADDS dweight += sum(dy xhat), dbias += sum(dy) over tokens.
template <class T, Index D = Dynamic>
class LayerNorm {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    Index dim = D;
    double eps = 1e-5;
    bool affine = true;
  };
  struct Cache {
    Matrix<T> xhat;  // (B*L, D)
    Vector<T> rstd;  // (B*L)
    Index batch = 0, length = 0;
  };

  LayerNorm() : LayerNorm(Config{D == Dynamic ? 0 : D}) {}
  explicit LayerNorm(const Config& cfg)
      : cfg_(cfg),
        weight_("weight", {detail::validated_norm_dim(D, cfg.dim, "LayerNorm: dim")}),
        bias_("bias", {cfg.dim}) {
    reset_parameters();
  }

  const Config& config() const { return cfg_; }
  void reset_parameters() {
    weight_.fill(T(1));
    bias_.fill(T(0));
  }
  Param<T>& weight() { return weight_; }
  Param<T>& bias() { return bias_; }

  template <class V>
  void visit_params(V&& v) {
    if (!cfg_.affine) return;
    v("weight", weight_);
    v("bias", bias_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    Tensor3<T> y;
    forward_into(ctx, x, cache, y);
    return y;
  }

  /// forward writing into `y` (reallocated only when its shape differs) and reusing the cache's storage, so a call
  /// with the same shapes as the previous one allocates nothing. With ctx.save_for_backward false the cache keeps
  /// nothing (backward then throws).
  void forward_into(Context& ctx, const Tensor3<T>& x, Cache& cache, Tensor3<T>& y) const {
    check_shape(x, {-1, -1, cfg_.dim}, "LayerNorm::forward: x");
    detail::require_positive_dim(cfg_.dim, "LayerNorm::forward");
    if (ctx.check_finite) check_finite(x, "LayerNorm::forward: x");
    const Index S = x.dimension(0) * x.dimension(1), Dn = cfg_.dim;
    const CMatrixMap<T> X = as_matrix(x);
    if (y.dimensions() != x.dimensions()) y = uninitialized<T, 3>(x.dimensions());
    MatrixMap<T> Y = as_matrix(y);
    const bool save = ctx.save_for_backward;
    cache.xhat.resize(save ? S : 0, Dn);
    cache.rstd.resize(save ? S : 0);
    cache.batch = x.dimension(0);
    cache.length = x.dimension(1);
    const T eps = static_cast<T>(cfg_.eps);
    const auto w = weight_.mat().row(0).array();
    const auto b = bias_.mat().row(0).array();
    detail::for_row_chunks(S, Dn, [&](Index r0, Index n) {
      for (Index i = r0; i < r0 + n; ++i) {
        // xhat goes to the cache when saved, else straight into y (and is then scaled in place).
        Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> xh(save ? cache.xhat.row(i).data() : Y.row(i).data(), Dn);
        xh = X.row(i).array() - X.row(i).mean();
        const T rstd = T(1) / std::sqrt(xh.square().mean() + eps);
        if (save) cache.rstd(i) = rstd;
        xh *= rstd;
        if (cfg_.affine)
          Y.row(i).array() = xh * w + b;
        else if (save)
          Y.row(i).array() = xh;
      }
    });
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& cache) {
    Tensor3<T> dx;
    backward_into(ctx, dy, cache, dx);
    return dx;
  }

  /// backward writing into `dx` (reallocated only when its shape differs).
  void backward_into(Context&, const Tensor3<T>& dy, const Cache& cache, Tensor3<T>& dx) {
    check_shape(dy, {cache.batch, cache.length, cfg_.dim}, "LayerNorm::backward: dy");
    const Index S = cache.batch * cache.length, Dn = cfg_.dim;
    if (cache.xhat.rows() != S)
      throw ValueError("LayerNorm::backward: the cache holds nothing for backward (forward ran with "
                       "ctx.save_for_backward = false)");
    const CMatrixMap<T> dY = as_matrix(dy);
    if (dx.dimensions() != dy.dimensions()) dx = uninitialized<T, 3>(dy.dimensions());
    MatrixMap<T> dX = as_matrix(dx);
    const auto w = weight_.mat().row(0).array();
    detail::for_row_chunks(S, Dn, [&](Index r0, Index n) {
      for (Index i = r0; i < r0 + n; ++i) {
        auto g = dX.row(i).array();
        if (cfg_.affine)
          g = dY.row(i).array() * w;
        else
          g = dY.row(i).array();
        const auto xh = cache.xhat.row(i).array();
        const T mg = g.mean();
        const T mgx = (g * xh).mean();
        g = (g - mg - xh * mgx) * cache.rstd(i);
      }
    });
    if (cfg_.affine && S > 0) {
      weight_.grad_mat().row(0).array() += (dY.array() * cache.xhat.array()).colwise().sum();
      bias_.grad_mat().row(0).noalias() += dY.colwise().sum();
    }
  }

 private:
  Config cfg_;
  Param<T> weight_, bias_;  // (D) each
};

// =====================================================================================================================

/// BatchNorm<T, D>: per-channel normalisation over the batch and the length, the reference's
/// SequenceNorm('batchnorm') = nn.BatchNorm1d(D) applied to x permuted to (B, D, L).
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// MATHS     train: mean_c, var_c over all B*L tokens (var biased), y = (x - mean) / sqrt(var + eps) * w + b;
///           eval: the same with running_mean, running_var.
///           Running update (train mode and ctx.update_statistics only), momentum m = 0.1:
///             running_mean = (1 - m) running_mean + m mean,
///             running_var  = (1 - m) running_var + m var * N / (N - 1)   (unbiased, N = B*L),
///             num_batches_tracked += 1.
/// PARAMS    weight (D) = 1, bias (D) = 0 (absent when Config::affine is false);
///           buffers running_mean (D) = 0, running_var (D) = 1, num_batches_tracked () = 0 (a count kept in T).
/// PADDING   ignored, exactly like the reference: padded positions enter the batch statistics. Feed batches
///           without padding (or accept the bias) when training with batchnorm.
/// REQUIRES  train mode needs N = B*L > 1 (ValueError otherwise, as PyTorch).
/// CACHE     xhat (B*L, D), 1/sqrt(var + eps) (D), and which statistics were used.
/// GRADIENTS backward returns dx (through the batch statistics in train mode; treating the running statistics as
///           constants in eval mode) and ADDS dweight += sum(dy xhat), dbias += sum(dy).
template <class T, Index D = Dynamic>
class BatchNorm {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    Index dim = D;
    double eps = 1e-5;
    bool affine = true;
    double momentum = 0.1;
  };
  struct Cache {
    Matrix<T> xhat;        // (B*L, D)
    Vector<T> invstd;      // (D)
    bool batch_stats = false;
    Index batch = 0, length = 0;
  };

  BatchNorm() : BatchNorm(Config{D == Dynamic ? 0 : D}) {}
  explicit BatchNorm(const Config& cfg)
      : cfg_(cfg),
        weight_("weight", {detail::validated_norm_dim(D, cfg.dim, "BatchNorm: dim")}),
        bias_("bias", {cfg.dim}),
        running_mean_("running_mean", {cfg.dim}, ParamKind::buffer),
        running_var_("running_var", {cfg.dim}, ParamKind::buffer),
        num_batches_tracked_("num_batches_tracked", {}, ParamKind::buffer) {
    if (!(cfg.momentum >= 0 && cfg.momentum <= 1))
      throw ValueError(str_cat("BatchNorm: momentum must be in [0, 1], got ", cfg.momentum));
    reset_parameters();
  }

  const Config& config() const { return cfg_; }
  void reset_parameters() {
    weight_.fill(T(1));
    bias_.fill(T(0));
    reset_running_stats();
  }
  void reset_running_stats() {
    running_mean_.fill(T(0));
    running_var_.fill(T(1));
    num_batches_tracked_.fill(T(0));
  }
  Param<T>& weight() { return weight_; }
  Param<T>& bias() { return bias_; }
  const Param<T>& running_mean() const { return running_mean_; }
  const Param<T>& running_var() const { return running_var_; }
  Param<T>& running_mean() { return running_mean_; }
  Param<T>& running_var() { return running_var_; }
  /// The number of running-statistics updates so far.
  Index num_batches_tracked() const { return static_cast<Index>(num_batches_tracked_.data()[0]); }

  /// The PyTorch state_dict order: weight, bias, running_mean, running_var, num_batches_tracked.
  template <class V>
  void visit_params(V&& v) {
    if (cfg_.affine) {
      v("weight", weight_);
      v("bias", bias_);
    }
    v("running_mean", running_mean_);
    v("running_var", running_var_);
    v("num_batches_tracked", num_batches_tracked_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, cfg_.dim}, "BatchNorm::forward: x");
    detail::require_positive_dim(cfg_.dim, "BatchNorm::forward");
    if (ctx.check_finite) check_finite(x, "BatchNorm::forward: x");
    const Index S = x.dimension(0) * x.dimension(1), Dn = cfg_.dim;
    const CMatrixMap<T> X = as_matrix(x);
    const T eps = static_cast<T>(cfg_.eps);
    cache.batch = x.dimension(0);
    cache.length = x.dimension(1);
    cache.batch_stats = ctx.training();

    Eigen::Array<T, 1, Eigen::Dynamic> mean(Dn), var(Dn);
    if (ctx.training()) {
      if (S <= 1)
        throw ValueError(str_cat("BatchNorm::forward: train mode needs more than one value per channel, got input ",
                                 shape_string(dims_of(x))));
      mean = X.colwise().mean().array();
      cache.xhat = X.rowwise() - mean.matrix();
      var = cache.xhat.array().square().colwise().mean();
      if (ctx.update_statistics) {
        const T m = static_cast<T>(cfg_.momentum);
        const T unbias = T(S) / T(S - 1);
        running_mean_.mat().row(0).array() = (T(1) - m) * running_mean_.mat().row(0).array() + m * mean;
        running_var_.mat().row(0).array() = (T(1) - m) * running_var_.mat().row(0).array() + m * unbias * var;
        num_batches_tracked_.data()[0] += T(1);
      }
    } else {
      mean = running_mean_.mat().row(0).array();
      var = running_var_.mat().row(0).array();
      cache.xhat = X.rowwise() - mean.matrix();
    }
    cache.invstd = (var + eps).rsqrt().matrix().transpose();
    cache.xhat.array().rowwise() *= cache.invstd.transpose().array();

    Tensor3<T> y = uninitialized<T, 3>(x.dimensions());
    MatrixMap<T> Y = as_matrix(y);
    if (cfg_.affine)
      Y.array() = (cache.xhat.array().rowwise() * weight_.mat().row(0).array()).rowwise() + bias_.mat().row(0).array();
    else
      Y = cache.xhat;
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.batch, cache.length, cfg_.dim}, "BatchNorm::backward: dy");
    const Index S = cache.xhat.rows();
    const CMatrixMap<T> dY = as_matrix(dy);
    Tensor3<T> dx = uninitialized<T, 3>(dy.dimensions());
    MatrixMap<T> dX = as_matrix(dx);
    if (S == 0) return dx;
    // sum over tokens of dy * xhat: both dweight and the train-mode dx need it.
    const Eigen::Array<T, 1, Eigen::Dynamic> sum_dy_xhat = (dY.array() * cache.xhat.array()).colwise().sum();
    const Eigen::Array<T, 1, Eigen::Dynamic> sum_dy = dY.colwise().sum().array();
    Eigen::Array<T, 1, Eigen::Dynamic> scale = cache.invstd.transpose().array();  // d xhat / d x (diagonal part)
    if (cfg_.affine) scale *= weight_.mat().row(0).array();
    if (cache.batch_stats) {
      const Eigen::Array<T, 1, Eigen::Dynamic> a = sum_dy / T(S), c = sum_dy_xhat / T(S);
      dX.array() = ((dY.array().rowwise() - a) - cache.xhat.array().rowwise() * c).rowwise() * scale;
    } else {
      dX.array() = dY.array().rowwise() * scale;
    }
    if (cfg_.affine) {
      weight_.grad_mat().row(0).array() += sum_dy_xhat;
      bias_.grad_mat().row(0).array() += sum_dy;
    }
    return dx;
  }

 private:
  Config cfg_;
  Param<T> weight_, bias_;  // (D) each
  // forward() is const so that one layer object can serve several forwards, each writing its own external Cache.
  // The running statistics are the one piece of state PyTorch's forward mutates (in train mode, as a side effect
  // that the train-mode output itself never reads), so they are mutable. Concurrent train-mode forwards with
  // ctx.update_statistics on would race on them: update from one thread, or turn update_statistics off.
  mutable Param<T> running_mean_, running_var_;  // (D) each
  mutable Param<T> num_batches_tracked_;         // () : the count, stored as T
};

// =====================================================================================================================

/// RMSNorm<T, D>: MEGA's RMSNorm, y = x * weight / sqrt(mean_D(x^2) + eps).
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// PARAMS    weight (D) = 1 (absent when Config::affine is false). No bias.
/// NOTE      eps defaults to 1e-6 as in MEGA's class; SequenceNorm passes its own eps (1e-5) as fairseq does.
/// CACHE     xhat = x / rms (B*L, D) and 1/rms (B*L).
/// GRADIENTS backward returns dx and ADDS dweight += sum over tokens of dy xhat.
template <class T, Index D = Dynamic>
class RMSNorm {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    Index dim = D;
    double eps = 1e-6;
    bool affine = true;
  };
  struct Cache {
    Matrix<T> xhat;  // (B*L, D)
    Vector<T> rinv;  // (B*L)
    Index batch = 0, length = 0;
  };

  RMSNorm() : RMSNorm(Config{D == Dynamic ? 0 : D}) {}
  explicit RMSNorm(const Config& cfg)
      : cfg_(cfg), weight_("weight", {detail::validated_norm_dim(D, cfg.dim, "RMSNorm: dim")}) {
    reset_parameters();
  }

  const Config& config() const { return cfg_; }
  void reset_parameters() { weight_.fill(T(1)); }
  Param<T>& weight() { return weight_; }

  template <class V>
  void visit_params(V&& v) {
    if (cfg_.affine) v("weight", weight_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, cfg_.dim}, "RMSNorm::forward: x");
    detail::require_positive_dim(cfg_.dim, "RMSNorm::forward");
    if (ctx.check_finite) check_finite(x, "RMSNorm::forward: x");
    cache.batch = x.dimension(0);
    cache.length = x.dimension(1);
    Tensor3<T> y = uninitialized<T, 3>(x.dimensions());
    MatrixMap<T> Y = as_matrix(y);
    detail::rms_forward(as_matrix(x), cfg_.affine ? weight_.data() : nullptr, false, static_cast<T>(cfg_.eps),
                        cache.xhat, cache.rinv, Y);
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.batch, cache.length, cfg_.dim}, "RMSNorm::backward: dy");
    Tensor3<T> dx = uninitialized<T, 3>(dy.dimensions());
    MatrixMap<T> dX = as_matrix(dx);
    const CMatrixMap<T> dY = as_matrix(dy);
    detail::rms_backward(cache.xhat, cache.rinv, cfg_.affine ? weight_.data() : nullptr, false, dY, dX);
    if (cfg_.affine && dY.rows() > 0)
      weight_.grad_mat().row(0).array() += (dY.array() * cache.xhat.array()).colwise().sum();
    return dx;
  }

 private:
  Config cfg_;
  Param<T> weight_;  // (D)
};

// =====================================================================================================================

/// ScaleNorm<T, D>: MEGA's ScaleNorm (the one the official LM's SequenceNorm('scalenorm') builds),
/// y = scalar * x / sqrt(mean_D(x^2) + eps): an RMS normalisation with ONE learned gain.
///
/// This is MEGA's definition (fairseq/modules/scale_norm.py), which divides by the root MEAN square plus eps; the
/// original ScaleNorm paper divides by max(||x||_2, eps) instead. The two differ by a factor sqrt(D) (absorbed
/// by the learned scalar) and in how eps enters; checkpoints of the official code need MEGA's form.
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// PARAMS    scalar (1) = 1 (absent when Config::affine is false).
/// CACHE     xhat = x / rms (B*L, D) and 1/rms (B*L).
/// GRADIENTS backward returns dx and ADDS dscalar += sum(dy xhat).
template <class T, Index D = Dynamic>
class ScaleNorm {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  struct Config {
    Index dim = D;
    double eps = 1e-6;
    bool affine = true;
  };
  struct Cache {
    Matrix<T> xhat;  // (B*L, D)
    Vector<T> rinv;  // (B*L)
    Index batch = 0, length = 0;
  };

  ScaleNorm() : ScaleNorm(Config{D == Dynamic ? 0 : D}) {}
  explicit ScaleNorm(const Config& cfg) : cfg_(cfg), scalar_("scalar", {1}) {
    detail::validated_norm_dim(D, cfg.dim, "ScaleNorm: dim");
    reset_parameters();
  }

  const Config& config() const { return cfg_; }
  void reset_parameters() { scalar_.fill(T(1)); }
  Param<T>& scalar() { return scalar_; }

  template <class V>
  void visit_params(V&& v) {
    if (cfg_.affine) v("scalar", scalar_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    check_shape(x, {-1, -1, cfg_.dim}, "ScaleNorm::forward: x");
    detail::require_positive_dim(cfg_.dim, "ScaleNorm::forward");
    if (ctx.check_finite) check_finite(x, "ScaleNorm::forward: x");
    cache.batch = x.dimension(0);
    cache.length = x.dimension(1);
    Tensor3<T> y = uninitialized<T, 3>(x.dimensions());
    MatrixMap<T> Y = as_matrix(y);
    detail::rms_forward(as_matrix(x), cfg_.affine ? scalar_.data() : nullptr, true, static_cast<T>(cfg_.eps),
                        cache.xhat, cache.rinv, Y);
    return y;
  }

  Tensor3<T> backward(Context&, const Tensor3<T>& dy, const Cache& cache) {
    check_shape(dy, {cache.batch, cache.length, cfg_.dim}, "ScaleNorm::backward: dy");
    Tensor3<T> dx = uninitialized<T, 3>(dy.dimensions());
    MatrixMap<T> dX = as_matrix(dx);
    const CMatrixMap<T> dY = as_matrix(dy);
    detail::rms_backward(cache.xhat, cache.rinv, cfg_.affine ? scalar_.data() : nullptr, true, dY, dX);
    if (cfg_.affine && dY.rows() > 0) scalar_.grad()[0] += (dY.array() * cache.xhat.array()).sum();
    return dx;
  }

 private:
  Config cfg_;
  Param<T> scalar_;  // (1)
};

// =====================================================================================================================

/// SequenceNorm<T, D>: fairseq's SequenceNorm. Holds one of the four norms, chosen at run time by Config::type,
/// and reports its parameters under "norm." as the reference's `self.norm = ...` member does, so a layer that
/// visits it as "norm." produces the official "norm.norm.weight", "norm.norm.running_var", ...
///
/// SHAPES    x (B, L, D) -> y (B, L, D).
/// PARAMS    layernorm: norm.weight, norm.bias (D); batchnorm: norm.weight, norm.bias, norm.running_mean,
///           norm.running_var (D), norm.num_batches_tracked (); scalenorm: norm.scalar (1); rmsnorm: norm.weight (D).
///           Config::eps (default 1e-5) is passed to whichever norm, as fairseq passes its eps.
/// CACHE     the chosen norm's Cache.
/// GRADIENTS those of the chosen norm.
template <class T, Index D = Dynamic>
class SequenceNorm {
 public:
  using Scalar = T;
  static constexpr Index kInDim = D, kOutDim = D;
  using Variant = std::variant<LayerNorm<T, D>, BatchNorm<T, D>, ScaleNorm<T, D>, RMSNorm<T, D>>;

  struct Config {
    NormType type = NormType::layernorm;
    Index dim = D;
    double eps = 1e-5;
    bool affine = true;
  };
  struct Cache {
    std::variant<typename LayerNorm<T, D>::Cache, typename BatchNorm<T, D>::Cache, typename ScaleNorm<T, D>::Cache,
                 typename RMSNorm<T, D>::Cache>
        inner;
  };

  SequenceNorm() = default;
  explicit SequenceNorm(const Config& cfg) : cfg_(cfg), norm_(make(cfg)) {}

  const Config& config() const { return cfg_; }
  NormType type() const { return cfg_.type; }
  /// Weight 1, bias 0 (and fresh running statistics), written in place so a bound ParamBuffer stays valid.
  void reset_parameters() {
    std::visit([](auto& n) { n.reset_parameters(); }, norm_);
  }
  /// The wrapped norm, e.g. `std::get<BatchNorm<T, D>>(seq_norm.variant())`.
  Variant& variant() { return norm_; }
  const Variant& variant() const { return norm_; }

  template <class V>
  void visit_params(V&& v) {
    std::visit([&](auto& n) { visit_child(v, "norm.", n); }, norm_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    switch (norm_.index()) {
      case 0: return forward_as<0>(ctx, x, cache);
      case 1: return forward_as<1>(ctx, x, cache);
      case 2: return forward_as<2>(ctx, x, cache);
      default: return forward_as<3>(ctx, x, cache);
    }
  }

  /// forward writing into `y` (reallocated only when its shape differs), reusing the cache's storage: LayerNorm
  /// then allocates nothing when called again with the same shapes (the other norms go through forward).
  void forward_into(Context& ctx, const Tensor3<T>& x, Cache& cache, Tensor3<T>& y) const {
    if (norm_.index() == 0) {
      if (cache.inner.index() != 0) cache.inner.template emplace<0>();
      std::get<0>(norm_).forward_into(ctx, x, std::get<0>(cache.inner), y);
    } else {
      y = forward(ctx, x, cache);
    }
  }

  /// backward writing into `dx` (reallocated only when its shape differs).
  void backward_into(Context& ctx, const Tensor3<T>& dy, const Cache& cache, Tensor3<T>& dx) {
    if (norm_.index() == 0 && cache.inner.index() == 0)
      std::get<0>(norm_).backward_into(ctx, dy, std::get<0>(cache.inner), dx);
    else
      dx = backward(ctx, dy, cache);
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& cache) {
    if (cache.inner.index() != norm_.index())
      throw ValueError(str_cat("SequenceNorm::backward: the cache was filled by another norm type (this layer is ",
                               to_string(cfg_.type), ")"));
    switch (norm_.index()) {
      case 0: return std::get<0>(norm_).backward(ctx, dy, std::get<0>(cache.inner));
      case 1: return std::get<1>(norm_).backward(ctx, dy, std::get<1>(cache.inner));
      case 2: return std::get<2>(norm_).backward(ctx, dy, std::get<2>(cache.inner));
      default: return std::get<3>(norm_).backward(ctx, dy, std::get<3>(cache.inner));
    }
  }

 private:
  template <std::size_t I>
  Tensor3<T> forward_as(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
    // Keep the cache's storage when it already holds this norm's cache (no reallocation on repeated calls).
    if (cache.inner.index() != I) cache.inner.template emplace<I>();
    return std::get<I>(norm_).forward(ctx, x, std::get<I>(cache.inner));
  }

  static Variant make(const Config& cfg) {
    switch (cfg.type) {
      case NormType::layernorm:
        return Variant(std::in_place_index<0>, typename LayerNorm<T, D>::Config{cfg.dim, cfg.eps, cfg.affine});
      case NormType::batchnorm:
        return Variant(std::in_place_index<1>, typename BatchNorm<T, D>::Config{cfg.dim, cfg.eps, cfg.affine});
      case NormType::scalenorm:
        return Variant(std::in_place_index<2>, typename ScaleNorm<T, D>::Config{cfg.dim, cfg.eps, cfg.affine});
      case NormType::rmsnorm:
        return Variant(std::in_place_index<3>, typename RMSNorm<T, D>::Config{cfg.dim, cfg.eps, cfg.affine});
    }
    throw ValueError("SequenceNorm: unknown norm type");
  }

  Config cfg_{NormType::layernorm, D == Dynamic ? 0 : D};
  Variant norm_;
};

}  // namespace sma
