// sma/layers/ema.hpp: MultiHeadEma, the multi-head damped EMA of MEGA / SeqBoat (the reference's MultiHeadEMA).
// Maths and derivations: docs/maths/ema.md. The ops underneath: ops/ema.hpp.
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/ops/ema.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sma {

/// WHAT      Per channel d: a sum of N damped exponential moving averages of x along the sequence, as a
///           convolution y = kernel * x, plus the skip term omega * x (ARCHITECTURE.md section 1 step 2). No SiLU:
///           the output is the reference's `ema_output` (convolution + omega * x).
///             p = sigmoid(delta), q = 1 - p sigmoid(alpha),
///             kernel[r, t] = sum_n p beta q^t gamma / sqrt(N),  t < K = min(L, truncation)
///             causal:        out[t] = sum_{j<=t, j<K} kernel[d, j] xm[t-j] + omega[d] x[t]
///             bidirectional: ... + sum_{t+j<L, j<K} kernel[D+d, j] xm[t+j]   (both sums include j = 0)
///           xm is x with the padded positions (ctx.padding, 1 = pad) zeroed; the omega term uses x unmasked, so
///           outputs at padded positions are defined but not meaningful, and outputs at real tokens do not depend
///           on padded inputs.
/// SHAPES    x (B, L, D) -> (B, L, D); ctx.padding, when set, (B, L).
/// PARAMS    official names and PyTorch shapes, R = D (causal) or 2D (bidirectional):
///             delta (R, N, 1), alpha (R, N, 1), beta (R, N, 1), gamma (R, N), omega (D).
///           reset_parameters(seed) follows the reference's reset_parameters_trunc: normal truncated at 2 std,
///           std 0.2 for delta and alpha; beta = (+1, -1, +1, ...) over n plus N(0, 0.02); gamma, omega N(0, 1).
/// ALGORITHM Config::algo (EmaAlgo): fft, scan, direct or automatic (cheapest by ops::ema_cost, chosen per call
///           and separately for forward and backward). All give the same numbers up to rounding.
/// CACHE     x and a copy of the padding mask: nothing derived from the parameters is kept, so parameter updates
///           between calls are always seen (the reference's cached kernel goes stale; this one cannot).
/// GRADIENTS backward(dy) returns dx = (1 - pad) * conv^T(dy) + omega * dy and ADDS d delta, d alpha, d beta,
///           d gamma (through the kernel, or through the scan) and d omega = sum dy * x to the Params' grad.
/// STREAMING causal only: step() / step_chunk() carry a (B, D, N) state and give exactly the full forward's value
///           at each position (with truncation a ring buffer of the last K inputs is kept: O(B K D) memory, O(D N)
///           work per token). Streaming takes no padding mask: feed real tokens only.
template <class T>
class MultiHeadEma {
 public:
  using Scalar = T;
  static constexpr Index kInDim = Dynamic, kOutDim = Dynamic;

  struct Config {
    Index dim = 0;                            ///< D (embed_dim)
    Index ndim = 2;                           ///< N, EMA orders per channel
    Direction direction = Direction::causal;  ///< bidirectional doubles the kernel rows
    Index truncation = 0;                     ///< kernel length cap K = min(L, truncation); 0 = none
    EmaAlgo algo = EmaAlgo::automatic;        ///< how the convolution is computed
  };

  /// What backward reads: the input and the padding mask of the forward call.
  struct Cache {
    Tensor3<T> x;  ///< (B, L, D)
    Mask padding;  ///< (B, L), meaningful only when has_padding
    bool has_padding = false;
  };

  /// Streaming state of one batch (causal only). `s` is the EMA state p beta * (sum of decayed inputs), the same
  /// quantity as the reference's incremental `prev_state`.
  struct StreamState {
    Tensor3<T> s;          ///< (B, D, N)
    Tensor3<T> history;    ///< (B, K, D) ring buffer of the last K inputs; empty without truncation
    Index position = 0;    ///< tokens consumed so far
    Index truncation = 0;  ///< the layer's truncation when the state was made (checked on every step)
    Index batch() const { return s.dimension(0); }
  };

  /// An empty placeholder (no parameters) for containers; assign a configured layer before use.
  MultiHeadEma() = default;
  /// Throws ValueError for dim < 1, ndim < 1 or truncation < 0. Parameters are initialised from `seed`.
  explicit MultiHeadEma(const Config& cfg, std::uint64_t seed = 0);

  const Config& config() const { return cfg_; }
  /// The algorithm and the truncation can change at any time (they do not change parameter shapes).
  void set_algo(EmaAlgo a) { cfg_.algo = a; }
  void set_truncation(Index truncation);
  /// R: kernel rows, D causal or 2D bidirectional.
  Index kernel_rows() const { return cfg_.direction == Direction::bidirectional ? 2 * cfg_.dim : cfg_.dim; }

  /// Re-draws every parameter like the reference's reset_parameters_trunc, deterministically from `seed`.
  void reset_parameters(std::uint64_t seed);

  template <class V>
  void visit_params(V&& v) {
    v("delta", delta_);
    v("alpha", alpha_);
    v("beta", beta_);
    v("gamma", gamma_);
    v("omega", omega_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const;    // (B, L, D) -> (B, L, D)
  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& cache);  // returns dx; grads +=

  /// The current kernel for a sequence of `length`: (R, min(length, truncation)), the reference's layout.
  Tensor2<T> kernel(Index length) const;

  /// A zero state for `batch` rows. Throws ValueError for a bidirectional layer.
  StreamState make_state(Index batch) const;
  /// One token per batch row: x_t (B, D) -> (B, D), equal to forward's output at position state.position.
  Tensor2<T> step(const Tensor2<T>& x_t, StreamState& state) const;
  /// C tokens per batch row: x (B, C, D) -> (B, C, D), equal to C calls of step (coefficients computed once).
  Tensor3<T> step_chunk(const Tensor3<T>& x, StreamState& state) const;

 private:
  ops::EmaShape shape_for(Index batch, Index length) const;
  ops::EmaParamsRef<T> params_ref() const { return {delta_.data(), alpha_.data(), beta_.data(), gamma_.data()}; }
  Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>> omega_row() const {
    return Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(omega_.data(), cfg_.dim);
  }
  void check_stream(const StreamState& state, Index batch, const char* where) const;
  /// xm for the convolution: x itself, or (with a mask) a copy in `store` with padded positions zeroed.
  static const T* masked_input(const Tensor3<T>& x, const Mask* mask, Tensor3<T>& store);
  static void zero_padded(const Mask& mask, Tensor3<T>& t);
  void step_rows(const ops::EmaCoeffs<T>& cf, const T* x_t, T* y_t, StreamState& state) const;

  void require_configured(const char* where) const {
    if (cfg_.dim < 1) throw ValueError(str_cat(where, ": the layer is default-constructed; assign a configured one"));
  }

  Config cfg_;
  Param<T> delta_, alpha_, beta_, gamma_, omega_;
};

// ---- implementation ----

namespace detail {

/// Normal(0, std) truncated to [-2 std, 2 std] by rejection (the reference's `Normal` helper).
inline double ema_truncated_normal(std::mt19937_64& rng, double std) {
  std::normal_distribution<double> nd(0.0, 1.0);
  double z;
  do z = nd(rng);
  while (z < -2.0 || z > 2.0);
  return std * z;
}

}  // namespace detail

template <class T>
MultiHeadEma<T>::MultiHeadEma(const Config& cfg, std::uint64_t seed) : cfg_(cfg) {
  if (cfg.dim < 1) throw ValueError(str_cat("MultiHeadEma: dim must be >= 1, got ", cfg.dim));
  if (cfg.ndim < 1) throw ValueError(str_cat("MultiHeadEma: ndim must be >= 1, got ", cfg.ndim));
  if (cfg.truncation < 0)
    throw ValueError(str_cat("MultiHeadEma: truncation must be >= 0 (0 = none), got ", cfg.truncation));
  const Index R = kernel_rows(), N = cfg.ndim;
  delta_ = Param<T>("delta", {R, N, 1});
  alpha_ = Param<T>("alpha", {R, N, 1});
  beta_ = Param<T>("beta", {R, N, 1});
  gamma_ = Param<T>("gamma", {R, N});
  omega_ = Param<T>("omega", {cfg.dim});
  reset_parameters(seed);
}

template <class T>
void MultiHeadEma<T>::set_truncation(Index truncation) {
  if (truncation < 0) throw ValueError(str_cat("MultiHeadEma: truncation must be >= 0 (0 = none), got ", truncation));
  cfg_.truncation = truncation;
}

template <class T>
void MultiHeadEma<T>::reset_parameters(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Index R = kernel_rows(), N = cfg_.ndim;
  for (Index i = 0; i < R * N; ++i) delta_.data()[i] = static_cast<T>(detail::ema_truncated_normal(rng, 0.2));
  for (Index i = 0; i < R * N; ++i) alpha_.data()[i] = static_cast<T>(detail::ema_truncated_normal(rng, 0.2));
  for (Index r = 0; r < R; ++r)
    for (Index n = 0; n < N; ++n)
      beta_.data()[r * N + n] = static_cast<T>((n % 2 == 0 ? 1.0 : -1.0) + detail::ema_truncated_normal(rng, 0.02));
  for (Index i = 0; i < R * N; ++i) gamma_.data()[i] = static_cast<T>(detail::ema_truncated_normal(rng, 1.0));
  for (Index i = 0; i < cfg_.dim; ++i) omega_.data()[i] = static_cast<T>(detail::ema_truncated_normal(rng, 1.0));
}

template <class T>
ops::EmaShape MultiHeadEma<T>::shape_for(Index batch, Index length) const {
  ops::EmaShape s;
  s.batch = batch;
  s.length = length;
  s.dim = cfg_.dim;
  s.order = cfg_.ndim;
  s.direction = cfg_.direction;
  s.truncation = cfg_.truncation;
  return s;
}

template <class T>
void MultiHeadEma<T>::zero_padded(const Mask& mask, Tensor3<T>& t) {
  const Index B = t.dimension(0), L = t.dimension(1), D = t.dimension(2);
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < L; ++s)
      if (mask(b, s)) std::fill(t.data() + (b * L + s) * D, t.data() + (b * L + s + 1) * D, T(0));
}

template <class T>
const T* MultiHeadEma<T>::masked_input(const Tensor3<T>& x, const Mask* mask, Tensor3<T>& store) {
  if (!mask) return x.data();
  store = x;
  zero_padded(*mask, store);
  return store.data();
}

template <class T>
Tensor3<T> MultiHeadEma<T>::forward(Context& ctx, const Tensor3<T>& x, Cache& cache) const {
  require_configured("MultiHeadEma::forward");
  const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.dim;
  check_shape(x, {-1, -1, D}, "MultiHeadEma::forward: x (B, L, D)");
  if (ctx.check_finite) check_finite(x, "MultiHeadEma::forward: x");
  const Mask* mask = ctx.padding_for(B, L, "MultiHeadEma::forward");

  Tensor3<T> xm_store;
  const T* xm = masked_input(x, mask, xm_store);
  Tensor3<T> y = uninitialized<T, 3>({B, L, D});  // (B, L, D)
  ops::ema_forward(cfg_.algo, shape_for(B, L), params_ref(), xm, y.data(), ctx.num_threads());
  as_matrix(y).array() += as_matrix(x).array().rowwise() * omega_row();
  cache.x = x;
  cache.has_padding = mask != nullptr;
  if (mask) cache.padding = *mask;
  return y;
}

template <class T>
Tensor3<T> MultiHeadEma<T>::backward(Context& ctx, const Tensor3<T>& dy, const Cache& cache) {
  require_configured("MultiHeadEma::backward");
  const Tensor3<T>& x = cache.x;
  const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.dim;
  check_shape(dy, {B, L, D}, "MultiHeadEma::backward: dy (B, L, D)");
  if (x.dimension(2) != D)
    throw ShapeError(str_cat("MultiHeadEma::backward: the cache holds x of shape ", shape_string(dims_of(x)),
                             ", not (B, L, ", D, "); was it filled by this layer's forward?"));
  const Mask* mask = cache.has_padding ? &cache.padding : nullptr;
  if (mask) check_shape(*mask, {B, L}, "MultiHeadEma::backward: cached padding mask");

  Tensor3<T> xm_store;
  const T* xm = masked_input(x, mask, xm_store);
  Tensor3<T> dx = uninitialized<T, 3>({B, L, D});  // (B, L, D)
  ops::EmaGradsRef<T> grads{delta_.grad(), alpha_.grad(), beta_.grad(), gamma_.grad()};
  ops::ema_backward(cfg_.algo, shape_for(B, L), params_ref(), xm, dy.data(), dx.data(), grads, ctx.num_threads());
  if (mask) zero_padded(*mask, dx);
  const auto dym = as_matrix(dy);
  as_matrix(dx).array() += dym.array().rowwise() * omega_row();
  Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>(omega_.grad(), D) +=
      (dym.array() * as_matrix(x).array()).colwise().sum();
  return dx;
}

template <class T>
Tensor2<T> MultiHeadEma<T>::kernel(Index length) const {
  if (length < 0) throw ValueError(str_cat("MultiHeadEma::kernel: negative length ", length));
  return ops::ema_kernel(params_ref(), kernel_rows(), cfg_.ndim, shape_for(1, length).kernel_size());
}

template <class T>
typename MultiHeadEma<T>::StreamState MultiHeadEma<T>::make_state(Index batch) const {
  require_configured("MultiHeadEma::make_state");
  if (cfg_.direction != Direction::causal)
    throw ValueError("MultiHeadEma::make_state: streaming needs a causal layer (a bidirectional EMA looks ahead)");
  if (batch < 0) throw ValueError(str_cat("MultiHeadEma::make_state: negative batch ", batch));
  StreamState st;
  st.s = zeros<T, 3>({batch, cfg_.dim, cfg_.ndim});
  if (cfg_.truncation > 0) st.history = zeros<T, 3>({batch, cfg_.truncation, cfg_.dim});
  st.position = 0;
  st.truncation = cfg_.truncation;
  return st;
}

template <class T>
void MultiHeadEma<T>::check_stream(const StreamState& state, Index batch, const char* where) const {
  require_configured(where);
  if (cfg_.direction != Direction::causal)
    throw ValueError(str_cat(where, ": streaming needs a causal layer (a bidirectional EMA looks ahead)"));
  check_shape(state.s, {batch, cfg_.dim, cfg_.ndim}, str_cat(where, ": state.s (B, D, N)"));
  if (state.truncation != cfg_.truncation)
    throw ValueError(str_cat(where, ": the state was made for truncation ", state.truncation, " but the layer now has ",
                             cfg_.truncation, "; make a new state"));
  if (cfg_.truncation > 0)
    check_shape(state.history, {batch, cfg_.truncation, cfg_.dim},
                str_cat(where, ": state.history (B, truncation, D)"));
}

template <class T>
void MultiHeadEma<T>::step_rows(const ops::EmaCoeffs<T>& cf, const T* x_t, T* y_t, StreamState& state) const {
  const Index B = state.batch(), D = cfg_.dim, N = cfg_.ndim, K = cfg_.truncation;
  // With truncation, the input that leaves the window (position - K) is subtracted with weight b q^K.
  const bool drop = K > 0 && state.position >= K;
  const Index slot = K > 0 ? state.position % K : 0;
  for (Index b = 0; b < B; ++b) {
    const T* xb = x_t + b * D;
    T* yb = y_t + b * D;
    T* sb = state.s.data() + b * D * N;
    T* hist = K > 0 ? state.history.data() + (b * K + slot) * D : nullptr;
    for (Index d = 0; d < D; ++d) {
      T acc = omega_.data()[d] * xb[d];
      const T xo = drop ? hist[d] : T(0);
      for (Index n = 0; n < N; ++n) {
        T& s = sb[d * N + n];
        s = cf.q(n, d) * s + cf.b(n, d) * xb[d] - (drop ? cf.bqk(n, d) * xo : T(0));
        acc += cf.c(n, d) * s;
      }
      yb[d] = acc;
      if (hist) hist[d] = xb[d];
    }
  }
  ++state.position;
}

template <class T>
Tensor2<T> MultiHeadEma<T>::step(const Tensor2<T>& x_t, StreamState& state) const {
  const Index B = x_t.dimension(0);
  check_shape(x_t, {-1, cfg_.dim}, "MultiHeadEma::step: x_t (B, D)");
  check_stream(state, B, "MultiHeadEma::step");
  const ops::EmaCoeffs<T> cf =
      ops::ema_coeffs(params_ref(), kernel_rows(), cfg_.ndim, std::max<Index>(cfg_.truncation, 1));
  Tensor2<T> y = uninitialized<T, 2>({B, cfg_.dim});  // (B, D)
  step_rows(cf, x_t.data(), y.data(), state);
  return y;
}

template <class T>
Tensor3<T> MultiHeadEma<T>::step_chunk(const Tensor3<T>& x, StreamState& state) const {
  const Index B = x.dimension(0), C = x.dimension(1), D = cfg_.dim;
  check_shape(x, {-1, -1, D}, "MultiHeadEma::step_chunk: x (B, C, D)");
  check_stream(state, B, "MultiHeadEma::step_chunk");
  const ops::EmaCoeffs<T> cf =
      ops::ema_coeffs(params_ref(), kernel_rows(), cfg_.ndim, std::max<Index>(cfg_.truncation, 1));
  Tensor3<T> y = uninitialized<T, 3>({B, C, D});  // (B, C, D)
  std::vector<T> xt(static_cast<std::size_t>(B * D)), yt(xt.size());
  for (Index c = 0; c < C; ++c) {
    for (Index b = 0; b < B; ++b)
      std::copy(x.data() + (b * C + c) * D, x.data() + (b * C + c + 1) * D, xt.data() + b * D);
    step_rows(cf, xt.data(), yt.data(), state);
    for (Index b = 0; b < B; ++b) std::copy(yt.data() + b * D, yt.data() + (b + 1) * D, y.data() + (b * C + c) * D);
  }
  return y;
}

}  // namespace sma
