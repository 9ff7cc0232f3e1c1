// sma/ops/ema.hpp: the multi-head damped EMA of MEGA / SeqBoat as plain ops (no Param objects): coefficients,
// kernel, the convolution y = k * x by three algorithms (FFT, scan, direct), and every backward pass.
// Maths, derivations and the cost model of EmaAlgo::automatic: docs/maths/ema.md.
//
// NOTATION (ARCHITECTURE.md section 1 step 2). D channels, N orders, R = D (causal) or 2D (bidirectional) kernel
// rows. Parameters delta, alpha, beta, gamma are (R, N) row-major (PyTorch's (R, N, 1) and (R, N) shapes share
// this memory layout). Per row r and order n:
//     p = sigmoid(delta), a = sigmoid(alpha), q = 1 - p a, b = p beta, c = gamma / sqrt(N), w = b c
//     kernel[r, t] = sum_n w[r,n] q[r,n]^t,   t = 0 .. K-1,   K = min(L, truncation) (K = L without truncation)
// Convolution of a (B, L, D) input xm (padded positions already zeroed by the caller):
//     y[b,t,d] = sum_{j=0}^{min(t,K-1)} kernel[d, j] xm[b,t-j,d]                        (rows 0..D-1 look back)
//              + sum_{j=0}^{min(L-1-t,K-1)} kernel[D+d, j] xm[b,t+j,d]   (bidirectional; rows D..2D-1 look ahead)
// Both sums include lag 0. The omega * x term and the padding mask belong to the layer (layers/ema.hpp).
//
// ALGORITHMS (EmaAlgo), all giving the same numbers up to rounding:
//   fft     circular convolution of length n >= L+K-1, n = 2^a 3^b 5^c with 4 | n (Eigen's kissfft, real FFTs);
//   scan    the recurrence s[t] = q s[t-1] + b x[t] - q^K b x[t-K] per (channel, order), y[t] = sum_n c s[t],
//           vectorised over channels; the look-ahead half runs backwards in time;
//   direct  the double loop over (t, lag), vectorised over channels; best for short kernels;
//   automatic  the cheapest by the cost model `ema_cost` (forward and backward are chosen separately).
// Every backward returns dxm and ADDS the gradients of the coefficient pair (w, q), which `ema_coeffs_backward`
// maps to delta, alpha, beta, gamma.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>
#include <sma/core/tensor.hpp>

#include <Eigen/Core>
#include <unsupported/Eigen/FFT>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sma {

/// How the EMA convolution is computed. `automatic` picks the cheapest by `ops::ema_cost`.
enum class EmaAlgo : std::uint8_t { automatic, fft, scan, direct };

inline const char* to_string(EmaAlgo a) {
  switch (a) {
    case EmaAlgo::automatic:
      return "automatic";
    case EmaAlgo::fft:
      return "fft";
    case EmaAlgo::scan:
      return "scan";
    case EmaAlgo::direct:
      return "direct";
  }
  return "?";
}

namespace ops {

/// Sizes of one EMA convolution problem.
struct EmaShape {
  Index batch = 0;                          ///< B
  Index length = 0;                         ///< L
  Index dim = 0;                            ///< D, channels of x
  Index order = 0;                          ///< N, EMA orders per channel
  Direction direction = Direction::causal;  ///< bidirectional doubles the kernel rows
  Index truncation = 0;                     ///< kernel length cap; 0 = none

  bool bidirectional() const { return direction == Direction::bidirectional; }
  /// R: kernel rows (D causal, 2D bidirectional).
  Index rows() const { return bidirectional() ? 2 * dim : dim; }
  /// K = min(L, truncation), or L without truncation.
  Index kernel_size() const { return truncation > 0 ? std::min(length, truncation) : length; }
};

/// Throws ValueError for negative sizes, N < 1, D < 1 or a negative truncation.
inline void ema_check_shape(const EmaShape& s, const char* where) {
  if (s.batch < 0 || s.length < 0)
    throw ValueError(str_cat(where, ": negative batch ", s.batch, " or length ", s.length));
  if (s.dim < 1) throw ValueError(str_cat(where, ": dim (D) must be >= 1, got ", s.dim));
  if (s.order < 1) throw ValueError(str_cat(where, ": ndim (N) must be >= 1, got ", s.order));
  if (s.truncation < 0) throw ValueError(str_cat(where, ": truncation must be >= 0 (0 = none), got ", s.truncation));
}

/// Read-only view of the four kernel parameters, each (R, N) row-major.
template <class T>
struct EmaParamsRef {
  const T* delta = nullptr;
  const T* alpha = nullptr;
  const T* beta = nullptr;
  const T* gamma = nullptr;
};

/// Gradient destinations for the four kernel parameters, each (R, N) row-major; written by ADDING.
template <class T>
struct EmaGradsRef {
  T* ddelta = nullptr;
  T* dalpha = nullptr;
  T* dbeta = nullptr;
  T* dgamma = nullptr;
};

/// Coefficients derived from the parameters, ORDER-major (N, R) so that loops over channels are contiguous.
/// Recomputed from the parameters on every call (never cached across calls, so they cannot go stale).
template <class T>
struct EmaCoeffs {
  Index rows = 0, order = 0, kernel_size = 0;  ///< R, N, K
  Matrix<T> p, a, q, b, c, w;    ///< (N, R) each: sigmoid(delta), sigmoid(alpha), 1-pa, p beta, gamma/sqrt(N), bc
  Matrix<T> qk, kqk1, bqk, cqk;  ///< (N, R): q^K, K q^(K-1), b q^K, c q^K (truncated scans)
};

/// Gradient of the loss w.r.t. the coefficient pair (w, q) of every (order, row), (N, R) each.
template <class T>
struct EmaCoeffGrads {
  Matrix<T> dw, dq;
  EmaCoeffGrads() = default;
  EmaCoeffGrads(Index order, Index rows) : dw(Matrix<T>::Zero(order, rows)), dq(Matrix<T>::Zero(order, rows)) {}
};

/// Coefficients for R kernel rows of N orders and kernel length K (K only matters for truncated scans).
template <class T>
EmaCoeffs<T> ema_coeffs(const EmaParamsRef<T>& prm, Index rows, Index order, Index kernel_size);

/// Maps (dw, dq) to the parameter gradients (added into `g`). Chain rule in docs/maths/ema.md#parameters.
template <class T>
void ema_coeffs_backward(const EmaCoeffs<T>& cf, const EmaParamsRef<T>& prm, const EmaCoeffGrads<T>& g,
                         const EmaGradsRef<T>& out);

/// The kernel LAG-major: (K, R), row t holds kernel[:, t] (contiguous over rows, for the direct convolution).
template <class T>
Matrix<T> ema_kernel_lags(const EmaCoeffs<T>& cf, Index size);

/// The kernel in the reference's layout (R, K): rows 0..D-1 look back, D..2D-1 look ahead (golden inter.kernel).
template <class T>
Tensor2<T> ema_kernel(const EmaParamsRef<T>& prm, Index rows, Index order, Index size);

/// Backward of the kernel: from dkernel (K, R) lag-major, ADDS dw[n,r] = sum_t dk[t,r] q^t and
/// dq[n,r] = w sum_t t dk[t,r] q^(t-1) into `g`.
template <class T>
void ema_kernel_backward(const EmaCoeffs<T>& cf, const Matrix<T>& dkernel, EmaCoeffGrads<T>& g);

/// Estimated single-core time (~ns) of each algorithm for this problem, forward or backward, for scalars of
/// `scalar_bytes` bytes (4 float, 8 double). The model and its fit: docs/maths/ema.md#choosing-the-algorithm.
struct EmaCost {
  double fft = 0, scan = 0, direct = 0;
};
inline EmaCost ema_cost(const EmaShape& s, bool backward, Index scalar_bytes = 8);

/// The algorithm `automatic` resolves to: the minimum of `ema_cost`.
inline EmaAlgo ema_choose_algo(const EmaShape& s, bool backward, Index scalar_bytes = 8);

/// The FFT length used for this problem: the smallest n >= L+K-1 with n = 2^a 3^b 5^c and 4 | n.
inline Index ema_fft_size(const EmaShape& s);

/// y (B, L, D) = kernel * xm, by `algo`. xm has its padded positions zeroed. `threads` 0 = OpenMP's default.
template <class T>
void ema_conv_forward(EmaAlgo algo, const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, T* y, int threads = 0);

/// Backward of ema_conv_forward: writes dxm (B, L, D) and ADDS the (w, q) gradients into `g`.
template <class T>
void ema_conv_backward(EmaAlgo algo, const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, const T* dy, T* dxm,
                       EmaCoeffGrads<T>& g, int threads = 0);

/// The algorithms one by one (same contracts as above; `kl` is the lag-major kernel of ema_kernel_lags).
template <class T>
void ema_conv_fft_forward(const EmaShape& s, const Matrix<T>& kl, const T* xm, T* y, int threads = 0);
template <class T>
void ema_conv_fft_backward(const EmaShape& s, const Matrix<T>& kl, const T* xm, const T* dy, T* dxm, Matrix<T>& dkl,
                           int threads = 0);
template <class T>
void ema_conv_direct_forward(const EmaShape& s, const Matrix<T>& kl, const T* xm, T* y, int threads = 0);
template <class T>
void ema_conv_direct_backward(const EmaShape& s, const Matrix<T>& kl, const T* xm, const T* dy, T* dxm, Matrix<T>& dkl,
                              int threads = 0);
template <class T>
void ema_conv_scan_forward(const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, T* y, int threads = 0);
template <class T>
void ema_conv_scan_backward(const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, const T* dy, T* dxm,
                            EmaCoeffGrads<T>& g, int threads = 0);

/// One call from parameters to output: coefficients, then ema_conv_forward.
template <class T>
void ema_forward(EmaAlgo algo, const EmaShape& s, const EmaParamsRef<T>& prm, const T* xm, T* y, int threads = 0);

/// One call from dy to dxm and the parameter gradients (ADDED into `grads`).
template <class T>
void ema_backward(EmaAlgo algo, const EmaShape& s, const EmaParamsRef<T>& prm, const T* xm, const T* dy, T* dxm,
                  const EmaGradsRef<T>& grads, int threads = 0);

// ---- implementation ----

namespace detail {

template <class T>
using ArrMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using CArrMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

inline int ema_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

/// Below this many multiply-adds a parallel region costs more than it saves.
inline constexpr double kEmaParallelWork = 32768.0;

/// Sets subnormal entries to 0 (they only arise in decayed kernel tails, where they are far below rounding).
template <class T>
void flush_subnormals(Matrix<T>& m) {
  // A plain loop: Eigen 3.4's select() is not vectorised, this is (with OpenMP's simd pragma).
  T* p = m.data();
  const Index n = m.size();
  const T tiny = std::numeric_limits<T>::min();
#pragma omp simd
  for (Index i = 0; i < n; ++i) p[i] = std::abs(p[i]) < tiny ? T(0) : p[i];
}

/// out = w * exp(t log q) elementwise: the exact re-anchoring of w q^t (Eigen's vectorised exp; pow is slower).
template <class T>
void ema_anchor(const Matrix<T>& w, const Matrix<T>& log_q, Index t, Matrix<T>& out) {
  out.resize(w.rows(), w.cols());
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(out.data(), out.size()) =
      Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(w.data(), w.size()) *
      (T(t) * Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(log_q.data(), log_q.size())).exp();
}

template <class T>
T ema_sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <class T>
using KissFft = Eigen::FFT<T, Eigen::internal::kissfft_impl<T>>;

/// One FFT engine per thread: kissfft keeps plans and scratch buffers inside, so it must not be shared. Plans
/// depend only on the length, never on parameters, so keeping them across calls is safe.
template <class T>
KissFft<T>& fft_engine() {
  using F = KissFft<T>;
  thread_local F engine(Eigen::internal::kissfft_impl<T>(),
                        static_cast<typename F::Flag>(F::HalfSpectrum | F::Unscaled));
  return engine;
}

/// Smallest m >= n with m = 2^a 3^b 5^c and 4 | m (kissfft's real transform needs 4 | m; prime lengths are slow).
inline Index fft_good_size(Index n) {
  Index m = std::max<Index>(4, (n + 3) / 4 * 4);
  for (;; m += 4) {
    Index r = m;
    for (Index p : {2, 3, 5})
      while (r % p == 0) r /= p;
    if (r == 1) return m;
  }
}

/// Lanes of the vectorised scans: one 64-byte vector (16 floats or 8 doubles; two AVX2 registers).
template <class T>
inline constexpr int kScanLanes = int(64 / sizeof(T));

template <class T>
using ScanLane = Eigen::Array<T, kScanLanes<T>, 1>;

/// Grow-only per-thread scratch of the scans (never holds parameter-derived data between calls).
template <class T>
T* scan_scratch(std::size_t n) {
  thread_local std::vector<T, Eigen::aligned_allocator<T>> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

/// Packs the coefficients of one lane group, kernel rows off..off+nv-1, as (N, 4, V): q, cin, cdrop, cout. Lanes
/// beyond nv get zeros (their state stays 0).
template <class T>
void scan_pack(const T* q, const T* cin, const T* cdrop, const T* cout, Index N, Index ld, Index off, Index nv, T* pk) {
  constexpr Index V = kScanLanes<T>;
  std::fill(pk, pk + N * 4 * V, T(0));
  for (Index n = 0; n < N; ++n) {
    T* p = pk + n * 4 * V;
    for (Index v = 0; v < nv; ++v) {
      p[v] = q[n * ld + off + v];
      p[V + v] = cin[n * ld + off + v];
      p[2 * V + v] = cdrop ? cdrop[n * ld + off + v] : T(0);
      p[3 * V + v] = cout[n * ld + off + v];
    }
  }
}

/// Four time steps t0, t0+dir, .. of the scan below, with the state of each order held in registers. With Drop,
/// the inputs K steps back (`old`) leave the window.
template <class T, bool Drop>
inline void scan_step4(const T* in, Index ldi, T* out, Index ldo, Index t0, Index dir, Index K, Index N, const T* pk,
                       bool accumulate, T* state) {
  constexpr Index V = kScanLanes<T>;
  using A = ScanLane<T>;
  using CM = Eigen::Map<const A>;
  using M = Eigen::Map<A>;
  const A x0 = CM(in + t0 * ldi), x1 = CM(in + (t0 + dir) * ldi), x2 = CM(in + (t0 + 2 * dir) * ldi),
          x3 = CM(in + (t0 + 3 * dir) * ldi);
  A o0, o1, o2, o3;
  if (Drop) {
    const Index t = t0 - dir * K;
    o0 = CM(in + t * ldi);
    o1 = CM(in + (t + dir) * ldi);
    o2 = CM(in + (t + 2 * dir) * ldi);
    o3 = CM(in + (t + 3 * dir) * ldi);
  }
  A y0, y1, y2, y3;
  if (accumulate) {
    y0 = CM(out + t0 * ldo);
    y1 = CM(out + (t0 + dir) * ldo);
    y2 = CM(out + (t0 + 2 * dir) * ldo);
    y3 = CM(out + (t0 + 3 * dir) * ldo);
  } else {
    y0.setZero();
    y1.setZero();
    y2.setZero();
    y3.setZero();
  }
  for (Index n = 0; n < N; ++n) {
    const T* c = pk + n * 4 * V;
    const A qn = CM(c), bn = CM(c + V), cn = CM(c + 3 * V);
    A s = CM(state + n * V);
    if (Drop) {
      const A dn = CM(c + 2 * V);
      s = qn * s + bn * x0 - dn * o0;
      y0 += cn * s;
      s = qn * s + bn * x1 - dn * o1;
      y1 += cn * s;
      s = qn * s + bn * x2 - dn * o2;
      y2 += cn * s;
      s = qn * s + bn * x3 - dn * o3;
      y3 += cn * s;
    } else {
      s = qn * s + bn * x0;
      y0 += cn * s;
      s = qn * s + bn * x1;
      y1 += cn * s;
      s = qn * s + bn * x2;
      y2 += cn * s;
      s = qn * s + bn * x3;
      y3 += cn * s;
    }
    M(state + n * V) = s;
  }
  M(out + t0 * ldo) = y0;
  M(out + (t0 + dir) * ldo) = y1;
  M(out + (t0 + 2 * dir) * ldo) = y2;
  M(out + (t0 + 3 * dir) * ldo) = y3;
}

/// The recurrence over one group of V channels (rows of `in` and `out` are `ldi` / `ldo` apart), forwards or
/// backwards in time:
///   st_n = q_n st_n + cin_n in[t] - cdrop_n in[t -+ K]   (the drop term once K inputs have been absorbed)
///   out[t] (+)= sum_n cout_n st_n
/// Vectorised across the V channels; `pk` holds (q, cin, cdrop, cout) per order (scan_pack); state is (N, V).
template <class T>
void scan_lanes(const T* in, Index ldi, T* out, Index ldo, Index L, Index N, Index K, const T* pk, bool reverse,
                bool accumulate, T* state) {
  constexpr Index V = kScanLanes<T>;
  using A = ScanLane<T>;
  using CM = Eigen::Map<const A>;
  using M = Eigen::Map<A>;
  std::fill(state, state + N * V, T(0));
  const Index dir = reverse ? -1 : 1;
  const auto row = [&](Index i) { return reverse ? L - 1 - i : i; };
  const auto single = [&](Index i) {
    const Index t = row(i);
    const A x = CM(in + t * ldi);
    A y = accumulate ? A(CM(out + t * ldo)) : A(A::Zero());
    const bool drop = i >= K;
    const A xo = drop ? A(CM(in + (t - dir * K) * ldi)) : A(A::Zero());
    for (Index n = 0; n < N; ++n) {
      const T* c = pk + n * 4 * V;
      M st(state + n * V);
      if (drop)
        st = CM(c) * st + CM(c + V) * x - CM(c + 2 * V) * xo;
      else
        st = CM(c) * st + CM(c + V) * x;
      y += CM(c + 3 * V) * st;
    }
    M(out + t * ldo) = y;
  };
  const Index free_steps = std::min(L, K);  // steps before an input leaves the window
  Index i = 0;
  for (; i + 4 <= free_steps; i += 4) scan_step4<T, false>(in, ldi, out, ldo, row(i), dir, K, N, pk, accumulate, state);
  for (; i < free_steps; ++i) single(i);
  for (; i + 4 <= L; i += 4) scan_step4<T, true>(in, ldi, out, ldo, row(i), dir, K, N, pk, accumulate, state);
  for (; i < L; ++i) single(i);
}

/// Four time steps of the gradient pass below (Drop: the inputs K steps back leave the window).
template <class T, bool Drop>
inline void scan_grad_step4(const T* x, Index ldx, const T* dy, Index ldg, Index t0, Index dir, Index K, Index N,
                            const T* pk, T* v, T* u, T* Acc, T* Qacc) {
  constexpr Index V = kScanLanes<T>;
  using A = ScanLane<T>;
  using CM = Eigen::Map<const A>;
  using M = Eigen::Map<A>;
  const A x0 = CM(x + t0 * ldx), x1 = CM(x + (t0 + dir) * ldx), x2 = CM(x + (t0 + 2 * dir) * ldx),
          x3 = CM(x + (t0 + 3 * dir) * ldx);
  const A g0 = CM(dy + t0 * ldg), g1 = CM(dy + (t0 + dir) * ldg), g2 = CM(dy + (t0 + 2 * dir) * ldg),
          g3 = CM(dy + (t0 + 3 * dir) * ldg);
  A o0, o1, o2, o3;
  if (Drop) {
    const Index t = t0 - dir * K;
    o0 = CM(x + t * ldx);
    o1 = CM(x + (t + dir) * ldx);
    o2 = CM(x + (t + 2 * dir) * ldx);
    o3 = CM(x + (t + 3 * dir) * ldx);
  }
  for (Index n = 0; n < N; ++n) {
    const T* c = pk + n * 4 * V;
    const A qn = CM(c);
    A vn = CM(v + n * V), un = CM(u + n * V), an = CM(Acc + n * V), bn = CM(Qacc + n * V);
    if (Drop) {
      const A qk = CM(c + V), kq = CM(c + 2 * V);
      un = qn * un + vn - kq * o0;
      vn = qn * vn + x0 - qk * o0;
      an += g0 * vn;
      bn += g0 * un;
      un = qn * un + vn - kq * o1;
      vn = qn * vn + x1 - qk * o1;
      an += g1 * vn;
      bn += g1 * un;
      un = qn * un + vn - kq * o2;
      vn = qn * vn + x2 - qk * o2;
      an += g2 * vn;
      bn += g2 * un;
      un = qn * un + vn - kq * o3;
      vn = qn * vn + x3 - qk * o3;
      an += g3 * vn;
      bn += g3 * un;
    } else {
      un = qn * un + vn;
      vn = qn * vn + x0;
      an += g0 * vn;
      bn += g0 * un;
      un = qn * un + vn;
      vn = qn * vn + x1;
      an += g1 * vn;
      bn += g1 * un;
      un = qn * un + vn;
      vn = qn * vn + x2;
      an += g2 * vn;
      bn += g2 * un;
      un = qn * un + vn;
      vn = qn * vn + x3;
      an += g3 * vn;
      bn += g3 * un;
    }
    M(v + n * V) = vn;
    M(u + n * V) = un;
    M(Acc + n * V) = an;
    M(Qacc + n * V) = bn;
  }
}

/// Gradient pass of one group of V channels: with v the unscaled state (s = b v) and u = dv/dq,
///   u_n = q u_n + v_n - K q^(K-1) x[t -+ K];  v_n = q v_n + x[t] - q^K x[t -+ K]
///   A_n += dy[t] v_n  (= dL/dw),   Q_n += dy[t] u_n  (dL/dq = w Q)
/// `pk` packs (q, q^K, K q^(K-1), unused) per order as scan_pack does; A and Q are (N, V), accumulated into.
template <class T>
void scan_grad_lanes(const T* x, Index ldx, const T* dy, Index ldg, Index L, Index N, Index K, const T* pk,
                     bool reverse, T* v, T* u, T* Acc, T* Qacc) {
  constexpr Index V = kScanLanes<T>;
  using A = ScanLane<T>;
  using CM = Eigen::Map<const A>;
  using M = Eigen::Map<A>;
  std::fill(v, v + N * V, T(0));
  std::fill(u, u + N * V, T(0));
  const Index dir = reverse ? -1 : 1;
  const auto row = [&](Index i) { return reverse ? L - 1 - i : i; };
  const auto single = [&](Index i) {
    const Index t = row(i);
    const A xt = CM(x + t * ldx), gt = CM(dy + t * ldg);
    const bool drop = i >= K;
    const A xo = drop ? A(CM(x + (t - dir * K) * ldx)) : A(A::Zero());
    for (Index n = 0; n < N; ++n) {
      const T* c = pk + n * 4 * V;
      M vn(v + n * V), un(u + n * V);
      if (drop) {
        un = CM(c) * un + vn - CM(c + 2 * V) * xo;
        vn = CM(c) * vn + xt - CM(c + V) * xo;
      } else {
        un = CM(c) * un + vn;
        vn = CM(c) * vn + xt;
      }
      M(Acc + n * V) += gt * vn;
      M(Qacc + n * V) += gt * un;
    }
  };
  const Index free_steps = std::min(L, K);
  Index i = 0;
  for (; i + 4 <= free_steps; i += 4) scan_grad_step4<T, false>(x, ldx, dy, ldg, row(i), dir, K, N, pk, v, u, Acc, Qacc);
  for (; i < free_steps; ++i) single(i);
  for (; i + 4 <= L; i += 4) scan_grad_step4<T, true>(x, ldx, dy, ldg, row(i), dir, K, N, pk, v, u, Acc, Qacc);
  for (; i < L; ++i) single(i);
}

/// Zero-padded (L, V) copies of a partial lane group (nv < V channels from d0) of an (L, D) slab, and back.
template <class T>
void copy_lanes_in(const T* slab, Index L, Index D, Index d0, Index nv, T* buf) {
  constexpr Index V = kScanLanes<T>;
  for (Index t = 0; t < L; ++t) {
    std::copy(slab + t * D + d0, slab + t * D + d0 + nv, buf + t * V);
    std::fill(buf + t * V + nv, buf + (t + 1) * V, T(0));
  }
}

template <class T>
void copy_lanes_out(const T* buf, Index L, Index D, Index d0, Index nv, T* slab) {
  constexpr Index V = kScanLanes<T>;
  for (Index t = 0; t < L; ++t) std::copy(buf + t * V, buf + t * V + nv, slab + t * D + d0);
}

}  // namespace detail

template <class T>
EmaCoeffs<T> ema_coeffs(const EmaParamsRef<T>& prm, Index rows, Index order, Index kernel_size) {
  EmaCoeffs<T> cf;
  cf.rows = rows;
  cf.order = order;
  cf.kernel_size = kernel_size;
  for (Matrix<T>* m : {&cf.p, &cf.a, &cf.q, &cf.b, &cf.c, &cf.w, &cf.qk, &cf.kqk1, &cf.bqk, &cf.cqk})
    m->resize(order, rows);
  const T scale = std::sqrt(T(1) / T(order));
  const Index K = std::max<Index>(kernel_size, 1);
  for (Index r = 0; r < rows; ++r) {
    for (Index n = 0; n < order; ++n) {
      const Index i = r * order + n;
      const T p = detail::ema_sigmoid(prm.delta[i]);
      const T a = detail::ema_sigmoid(prm.alpha[i]);
      const T q = T(1) - p * a;
      const T b = p * prm.beta[i];
      const T c = prm.gamma[i] * scale;
      const T qk1 = std::pow(q, T(K - 1));
      cf.p(n, r) = p;
      cf.a(n, r) = a;
      cf.q(n, r) = q;
      cf.b(n, r) = b;
      cf.c(n, r) = c;
      cf.w(n, r) = b * c;
      cf.qk(n, r) = qk1 * q;
      cf.kqk1(n, r) = T(K) * qk1;
      cf.bqk(n, r) = b * qk1 * q;
      cf.cqk(n, r) = c * qk1 * q;
    }
  }
  return cf;
}

template <class T>
void ema_coeffs_backward(const EmaCoeffs<T>& cf, const EmaParamsRef<T>& prm, const EmaCoeffGrads<T>& g,
                         const EmaGradsRef<T>& out) {
  const Index N = cf.order;
  const T scale = std::sqrt(T(1) / T(N));
  for (Index r = 0; r < cf.rows; ++r) {
    for (Index n = 0; n < N; ++n) {
      const Index i = r * N + n;
      const T p = cf.p(n, r), a = cf.a(n, r);
      const T gw = g.dw(n, r), gq = g.dq(n, r);
      const T dp = gw * prm.beta[i] * prm.gamma[i] * scale - a * gq;
      const T da = -p * gq;
      out.ddelta[i] += dp * p * (T(1) - p);
      out.dalpha[i] += da * a * (T(1) - a);
      out.dbeta[i] += gw * p * prm.gamma[i] * scale;
      out.dgamma[i] += gw * p * prm.beta[i] * scale;
    }
  }
}

template <class T>
Matrix<T> ema_kernel_lags(const EmaCoeffs<T>& cf, Index size) {
  const Index R = cf.rows, N = cf.order;
  Matrix<T> kl(size, R);
  // term = w q^t by repeated multiplication, re-anchored with pow every 64 lags so rounding cannot pile up.
  // Terms that underflow are flushed to 0: subnormal arithmetic is ~100x slower and changes nothing visible.
  Matrix<T> term = cf.w;
  const Matrix<T> log_q = cf.q.array().log().matrix();
  for (Index t = 0; t < size; ++t) {
    if (t > 0 && t % 64 == 0) {
      detail::ema_anchor(cf.w, log_q, t, term);
      detail::flush_subnormals(term);
    }
    detail::ArrMap<T> row(kl.data() + t * R, R);
    row = detail::CArrMap<T>(term.data(), R);
    for (Index n = 1; n < N; ++n) row += detail::CArrMap<T>(term.data() + n * R, R);
    term.array() *= cf.q.array();
    detail::flush_subnormals(term);
  }
  detail::flush_subnormals(kl);
  return kl;
}

template <class T>
Tensor2<T> ema_kernel(const EmaParamsRef<T>& prm, Index rows, Index order, Index size) {
  const EmaCoeffs<T> cf = ema_coeffs(prm, rows, order, size);
  const Matrix<T> kl = ema_kernel_lags(cf, size);
  Tensor2<T> k = uninitialized<T, 2>({rows, size});
  for (Index r = 0; r < rows; ++r)
    for (Index t = 0; t < size; ++t) k(r, t) = kl(t, r);
  return k;
}

template <class T>
void ema_kernel_backward(const EmaCoeffs<T>& cf, const Matrix<T>& dk, EmaCoeffGrads<T>& g) {
  const Index R = cf.rows, N = cf.order, K = dk.rows();
  if (g.dw.rows() != N || g.dw.cols() != R) g = EmaCoeffGrads<T>(N, R);
  Matrix<T> dq_sum = Matrix<T>::Zero(N, R);
  Matrix<T> qt = Matrix<T>::Ones(N, R);   // q^t
  Matrix<T> qt1 = Matrix<T>::Zero(N, R);  // q^(t-1)
  const Matrix<T> ones = Matrix<T>::Ones(N, R), log_q = cf.q.array().log().matrix();
  for (Index t = 0; t < K; ++t) {
    if (t > 0 && t % 64 == 0) {
      detail::ema_anchor(ones, log_q, t, qt);
      detail::ema_anchor(ones, log_q, t - 1, qt1);
      detail::flush_subnormals(qt);
      detail::flush_subnormals(qt1);
    }
    detail::CArrMap<T> dkt(dk.data() + t * R, R);
    for (Index n = 0; n < N; ++n) {
      detail::ArrMap<T>(g.dw.data() + n * R, R) += dkt * detail::CArrMap<T>(qt.data() + n * R, R);
      if (t > 0) detail::ArrMap<T>(dq_sum.data() + n * R, R) += T(t) * dkt * detail::CArrMap<T>(qt1.data() + n * R, R);
    }
    qt1 = qt;
    qt.array() *= cf.q.array();
    detail::flush_subnormals(qt);
  }
  g.dq.array() += cf.w.array() * dq_sum.array();
}

inline Index ema_fft_size(const EmaShape& s) { return detail::fft_good_size(s.length + s.kernel_size() - 1); }

// Cost model (docs/maths/ema.md#choosing-the-algorithm), in ~ns of one core, fitted on this project's 2-core
// AMD EPYC (thread CPU time, float and double, D 16..256, L 256..4096, N 2..32). `w` = scalar_bytes / 4: the
// vectorised loops cost twice as much in double; kissfft (scalar complex code) about 1.8 times.
inline EmaCost ema_cost(const EmaShape& s, bool backward, Index scalar_bytes) {
  const double B = double(s.batch), L = double(s.length), D = double(std::max<Index>(s.dim, 1));
  const double N = double(s.order), K = double(s.kernel_size()), dirs = s.bidirectional() ? 2.0 : 1.0;
  const double w = double(scalar_bytes) / 4.0, rows = B * D;
  const bool truncated = K < L;
  EmaCost c;
  // scan: per (t, channel) a recurrence step for each of N orders plus loading x / storing y, 16 float (8 double)
  // channels per vector instruction. The truncated recurrence also reads x[t-K]; backward runs the adjoint plus
  // the (v, u) pair of states. Double costs about 3 times float here (half the lanes, and more memory traffic).
  const double w_scan = scalar_bytes > 4 ? 3.0 : 1.0;
  c.scan = rows * L * dirs * w_scan * (0.05 * N + 0.15) * (truncated ? 1.35 : 1.0) * (backward ? 2.2 : 1.0);
  // direct: a vectorised multiply-add over D channels per (t, lag), with a fixed cost per row op; backward
  // computes dxm and the kernel correlation; plus building (and differentiating) the kernel.
  const double pairs = L * K - K * (K - 1) / 2;
  const double kernel = 0.29 * w * K * D * dirs * N * (backward ? 3.0 : 1.0);
  c.direct = rows * pairs * dirs * (0.09 * w + 3.0 / D) * (backward ? 2.0 : 1.0) + kernel;
  // fft: per (batch row, channel) 2 real transforms of length n forward, 3 and the spectral products backward.
  if (s.length > 0) {
    const double n = double(ema_fft_size(s));
    c.fft = 1.35 * (1.0 + 0.8 * (w - 1.0)) * rows * n * std::log2(n) * (backward ? 2.1 : 1.0) + kernel;
  }
  return c;
}

inline EmaAlgo ema_choose_algo(const EmaShape& s, bool backward, Index scalar_bytes) {
  const EmaCost c = ema_cost(s, backward, scalar_bytes);
  if (c.direct <= c.scan && c.direct <= c.fft) return EmaAlgo::direct;
  return c.scan <= c.fft ? EmaAlgo::scan : EmaAlgo::fft;
}

template <class T>
void ema_conv_scan_forward(const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, T* y, int threads) {
  const Index B = s.batch, L = s.length, D = s.dim, N = s.order, K = s.kernel_size(), R = s.rows();
  if (B == 0 || L == 0) return;
  constexpr Index V = detail::kScanLanes<T>;
  const int nt = detail::ema_threads(threads);
  const Index groups = (D + V - 1) / V;
  const double work = double(B) * L * D * N * (s.bidirectional() ? 2 : 1);
  const bool trunc = K < L;
#pragma omp parallel num_threads(nt) if (nt > 1 && B * groups > 1 && work > detail::kEmaParallelWork)
  {
    // Layout: state (N V) | packs back, ahead (4 N V each) | padded x, y (L V each).
    T* state = detail::scan_scratch<T>(static_cast<std::size_t>(9 * N * V + 2 * L * V));
    T* pk_back = state + N * V;
    T* pk_ahead = pk_back + 4 * N * V;
    T* xbuf = pk_ahead + 4 * N * V;
    T* ybuf = xbuf + L * V;
#pragma omp for schedule(dynamic, 1)
    for (Index task = 0; task < B * groups; ++task) {
      const Index b = task / groups, d0 = (task % groups) * V, nv = std::min(V, D - d0);
      const T* xb = xm + b * L * D;
      T* yb = y + b * L * D;
      const T* in = xb + d0;
      T* out = yb + d0;
      Index ld = D;
      if (nv < V) {
        detail::copy_lanes_in(xb, L, D, d0, nv, xbuf);
        in = xbuf;
        out = ybuf;
        ld = V;
      }
      detail::scan_pack(cf.q.data(), cf.b.data(), trunc ? cf.bqk.data() : nullptr, cf.c.data(), N, R, d0, nv, pk_back);
      detail::scan_lanes(in, ld, out, ld, L, N, K, pk_back, false, false, state);
      if (s.bidirectional()) {
        detail::scan_pack(cf.q.data(), cf.b.data(), trunc ? cf.bqk.data() : nullptr, cf.c.data(), N, R, D + d0, nv,
                          pk_ahead);
        detail::scan_lanes(in, ld, out, ld, L, N, K, pk_ahead, true, true, state);
      }
      if (nv < V) detail::copy_lanes_out(ybuf, L, D, d0, nv, yb);
    }
  }
}

template <class T>
void ema_conv_scan_backward(const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, const T* dy, T* dxm,
                            EmaCoeffGrads<T>& g, int threads) {
  const Index B = s.batch, L = s.length, D = s.dim, N = s.order, K = s.kernel_size(), R = s.rows();
  if (g.dw.rows() != N || g.dw.cols() != R) g = EmaCoeffGrads<T>(N, R);
  if (B == 0 || L == 0) return;
  constexpr Index V = detail::kScanLanes<T>;
  const int nt = detail::ema_threads(threads);
  const Index groups = (D + V - 1) / V;
  const double work = 3.0 * double(B) * L * D * N * (s.bidirectional() ? 2 : 1);
  const bool par = nt > 1 && B * groups > 1 && work > detail::kEmaParallelWork;
  const int used = par ? nt : 1;
  const bool trunc = K < L;
  // Per-thread (A, Q) accumulators, (N, R): tasks of different batch rows share kernel rows.
  std::vector<Matrix<T>> acc_a(static_cast<std::size_t>(used), Matrix<T>::Zero(N, R));
  std::vector<Matrix<T>> acc_q(static_cast<std::size_t>(used), Matrix<T>::Zero(N, R));
#pragma omp parallel num_threads(used) if (par)
  {
#ifdef _OPENMP
    const std::size_t me = static_cast<std::size_t>(omp_get_thread_num());
#else
    const std::size_t me = 0;
#endif
    // Layout: st, v, u, a, q (N V each) | adjoint pack, gradient pack (4 N V each) | padded x, dy, dx (L V each).
    T* st = detail::scan_scratch<T>(static_cast<std::size_t>(13 * N * V + 3 * L * V));
    T* v = st + N * V;
    T* u = v + N * V;
    T* la = u + N * V;
    T* lq = la + N * V;
    T* adj = lq + N * V;
    T* gr = adj + 4 * N * V;
    T* xbuf = gr + 4 * N * V;
    T* gbuf = xbuf + L * V;
    T* dxbuf = gbuf + L * V;
    T* A = acc_a[me].data();
    T* Q = acc_q[me].data();
#pragma omp for schedule(dynamic, 1)
    for (Index task = 0; task < B * groups; ++task) {
      const Index b = task / groups, d0 = (task % groups) * V, nv = std::min(V, D - d0);
      const T* xb = xm + b * L * D;
      const T* gb = dy + b * L * D;
      T* dxb = dxm + b * L * D;
      const T* xin = xb + d0;
      const T* gin = gb + d0;
      T* dxo = dxb + d0;
      Index ld = D;
      if (nv < V) {
        detail::copy_lanes_in(xb, L, D, d0, nv, xbuf);
        detail::copy_lanes_in(gb, L, D, d0, nv, gbuf);
        xin = xbuf;
        gin = gbuf;
        dxo = dxbuf;
        ld = V;
      }
      for (int h = 0; h < (s.bidirectional() ? 2 : 1); ++h) {
        const Index off = h * D + d0;
        // Adjoint of the look-back half (h = 0) runs backwards in time; of the look-ahead half, forwards.
        detail::scan_pack(cf.q.data(), cf.c.data(), trunc ? cf.cqk.data() : nullptr, cf.b.data(), N, R, off, nv, adj);
        detail::scan_lanes(gin, ld, dxo, ld, L, N, K, adj, h == 0, h == 1, st);
        detail::scan_pack(cf.q.data(), cf.qk.data(), cf.kqk1.data(), cf.q.data(), N, R, off, nv, gr);
        std::fill(la, la + N * V, T(0));
        std::fill(lq, lq + N * V, T(0));
        detail::scan_grad_lanes(xin, ld, gin, ld, L, N, K, gr, h == 1, v, u, la, lq);
        for (Index n = 0; n < N; ++n)
          for (Index l = 0; l < nv; ++l) {
            A[n * R + off + l] += la[n * V + l];
            Q[n * R + off + l] += lq[n * V + l];
          }
      }
      if (nv < V) detail::copy_lanes_out(dxbuf, L, D, d0, nv, dxb);
    }
  }
  for (int i = 0; i < used; ++i) {
    g.dw += acc_a[static_cast<std::size_t>(i)];
    g.dq.array() += cf.w.array() * acc_q[static_cast<std::size_t>(i)].array();
  }
}

template <class T>
void ema_conv_direct_forward(const EmaShape& s, const Matrix<T>& kl, const T* xm, T* y, int threads) {
  const Index B = s.batch, L = s.length, D = s.dim, K = s.kernel_size(), R = s.rows();
  if (B == 0 || L == 0) return;
  const int nt = detail::ema_threads(threads);
  const double work = double(B) * L * K * D * (s.bidirectional() ? 2 : 1);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && work > detail::kEmaParallelWork)
  for (Index row = 0; row < B * L; ++row) {
    const Index t = row % L;
    detail::ArrMap<T> yt(y + row * D, D);
    yt = detail::CArrMap<T>(kl.data(), D) * detail::CArrMap<T>(xm + row * D, D);
    const Index jb = std::min(t, K - 1);
    for (Index j = 1; j <= jb; ++j)
      yt += detail::CArrMap<T>(kl.data() + j * R, D) * detail::CArrMap<T>(xm + (row - j) * D, D);
    if (s.bidirectional()) {
      const Index jf = std::min(L - 1 - t, K - 1);
      for (Index j = 0; j <= jf; ++j)
        yt += detail::CArrMap<T>(kl.data() + j * R + D, D) * detail::CArrMap<T>(xm + (row + j) * D, D);
    }
  }
}

template <class T>
void ema_conv_direct_backward(const EmaShape& s, const Matrix<T>& kl, const T* xm, const T* dy, T* dxm, Matrix<T>& dkl,
                              int threads) {
  const Index B = s.batch, L = s.length, D = s.dim, K = s.kernel_size(), R = s.rows();
  dkl.setZero(K, R);
  if (B == 0 || L == 0) return;
  const int nt = detail::ema_threads(threads);
  const double work = double(B) * L * K * D * (s.bidirectional() ? 2 : 1);
  const bool par = nt > 1 && work > detail::kEmaParallelWork;
  // dxm: the transposed convolution (look-back rows now look ahead and vice versa).
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
  for (Index row = 0; row < B * L; ++row) {
    const Index t = row % L;
    detail::ArrMap<T> g(dxm + row * D, D);
    g = detail::CArrMap<T>(kl.data(), D) * detail::CArrMap<T>(dy + row * D, D);
    const Index jf = std::min(L - 1 - t, K - 1);
    for (Index j = 1; j <= jf; ++j)
      g += detail::CArrMap<T>(kl.data() + j * R, D) * detail::CArrMap<T>(dy + (row + j) * D, D);
    if (s.bidirectional()) {
      const Index jb = std::min(t, K - 1);
      for (Index j = 0; j <= jb; ++j)
        g += detail::CArrMap<T>(kl.data() + j * R + D, D) * detail::CArrMap<T>(dy + (row - j) * D, D);
    }
  }
  // dkernel[j] = correlation of dy with xm at lag j; each lag is independent (cyclic schedule: lag j has L-j terms).
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (par)
  for (Index j = 0; j < K; ++j) {
    detail::ArrMap<T> back(dkl.data() + j * R, D);
    for (Index b = 0; b < B; ++b) {
      const T* gb = dy + b * L * D;
      const T* xb = xm + b * L * D;
      for (Index t = j; t < L; ++t) back += detail::CArrMap<T>(gb + t * D, D) * detail::CArrMap<T>(xb + (t - j) * D, D);
    }
    if (s.bidirectional()) {
      detail::ArrMap<T> ahead(dkl.data() + j * R + D, D);
      for (Index b = 0; b < B; ++b) {
        const T* gb = dy + b * L * D;
        const T* xb = xm + b * L * D;
        for (Index t = 0; t + j < L; ++t)
          ahead += detail::CArrMap<T>(gb + t * D, D) * detail::CArrMap<T>(xb + (t + j) * D, D);
      }
    }
  }
}

namespace detail {

/// Channels per block of the FFT path: the gather/scatter then moves whole cache lines of (B, L, D) rows, and the
/// per-thread buffers stay small (a few blocks of L).
inline constexpr Index kFftChannelBlock = 8;

/// Grow-only scratch of one thread. The FFT path needs O(block * L) floats per thread; keeping them across calls
/// avoids fresh page-faulting allocations (expensive in VMs). Never holds parameter-derived data between calls.
template <class T>
T* fft_scratch(std::size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
template <class T>
std::complex<T>* fft_scratch_complex(std::size_t n) {
  thread_local std::vector<std::complex<T>> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

/// The circular kernel of channel d, scaled by `scale`: look-back lags at 0..K-1, look-ahead lags at n-1..n-K+1
/// (lag 0 of both halves lands on index 0).
template <class T>
void fft_circular_kernel(const EmaShape& s, const Matrix<T>& kl, Index d, Index n, T scale, T* kc) {
  const Index K = s.kernel_size(), R = s.rows(), D = s.dim;
  std::fill(kc, kc + n, T(0));
  for (Index j = 0; j < K; ++j) kc[j] = kl(j, d) * scale;
  if (s.bidirectional())
    for (Index j = 0; j < K; ++j) kc[(n - j) % n] += kl.data()[j * R + D + d] * scale;
}

/// blk (cb, L) = channels [d0, d0+cb) of one (L, D) slab, transposed.
template <class T>
void gather_channels(const T* slab, Index L, Index D, Index d0, Index cb, T* blk) {
  for (Index t = 0; t < L; ++t) {
    const T* row = slab + t * D + d0;
    for (Index c = 0; c < cb; ++c) blk[c * L + t] = row[c];
  }
}

/// The inverse of gather_channels.
template <class T>
void scatter_channels(const T* blk, Index L, Index D, Index d0, Index cb, T* slab) {
  for (Index t = 0; t < L; ++t) {
    T* row = slab + t * D + d0;
    for (Index c = 0; c < cb; ++c) row[c] = blk[c * L + t];
  }
}

/// buf (n) = row (L) followed by zeros; then its half spectrum into `out` (n/2+1).
template <class T>
void fft_row(KissFft<T>& fft, const T* row, Index L, Index n, T* buf, std::complex<T>* out) {
  std::copy(row, row + L, buf);
  std::fill(buf + L, buf + n, T(0));
  fft.fwd(out, buf, n);
}

}  // namespace detail

template <class T>
void ema_conv_fft_forward(const EmaShape& s, const Matrix<T>& kl, const T* xm, T* y, int threads) {
  using Cx = std::complex<T>;
  const Index B = s.batch, L = s.length, D = s.dim;
  if (B == 0 || L == 0) return;
  const int nt = detail::ema_threads(threads);
  const Index n = ema_fft_size(s), nf = n / 2 + 1, cbw = detail::kFftChannelBlock;
  const Index nblk = (D + cbw - 1) / cbw;
  const double work = double(B + 1) * D * n * std::log2(double(n)) * 4;
#pragma omp parallel num_threads(nt) if (nt > 1 && nblk > 1 && work > detail::kEmaParallelWork)
  {
    auto& fft = detail::fft_engine<T>();
    T* buf = detail::fft_scratch<T>(static_cast<std::size_t>(n + 2 * cbw * L));
    T* xin = buf + n;
    T* yout = xin + cbw * L;
    Cx* kf = detail::fft_scratch_complex<T>(static_cast<std::size_t>((cbw + 1) * nf));
    Cx* xf = kf + cbw * nf;
#pragma omp for schedule(dynamic)
    for (Index blk = 0; blk < nblk; ++blk) {
      const Index d0 = blk * cbw, cb = std::min(cbw, D - d0);
      for (Index c = 0; c < cb; ++c) {
        detail::fft_circular_kernel(s, kl, d0 + c, n, T(1) / T(n), buf);
        fft.fwd(kf + c * nf, buf, n);
      }
      for (Index b = 0; b < B; ++b) {
        detail::gather_channels(xm + b * L * D, L, D, d0, cb, xin);
        for (Index c = 0; c < cb; ++c) {
          detail::fft_row(fft, xin + c * L, L, n, buf, xf);
          const Cx* k = kf + c * nf;
          for (Index i = 0; i < nf; ++i) xf[i] *= k[i];
          fft.inv(buf, xf, n);
          std::copy(buf, buf + L, yout + c * L);
        }
        detail::scatter_channels(yout, L, D, d0, cb, y + b * L * D);
      }
    }
  }
}

template <class T>
void ema_conv_fft_backward(const EmaShape& s, const Matrix<T>& kl, const T* xm, const T* dy, T* dxm, Matrix<T>& dkl,
                           int threads) {
  using Cx = std::complex<T>;
  const Index B = s.batch, L = s.length, D = s.dim, K = s.kernel_size(), R = s.rows();
  dkl.setZero(K, R);
  if (B == 0 || L == 0) return;
  const int nt = detail::ema_threads(threads);
  const Index n = ema_fft_size(s), nf = n / 2 + 1, cbw = detail::kFftChannelBlock;
  const Index nblk = (D + cbw - 1) / cbw;
  const T inv_n = T(1) / T(n);
  const double work = double(B + 1) * D * n * std::log2(double(n)) * 6;
#pragma omp parallel num_threads(nt) if (nt > 1 && nblk > 1 && work > detail::kEmaParallelWork)
  {
    auto& fft = detail::fft_engine<T>();
    T* buf = detail::fft_scratch<T>(static_cast<std::size_t>(n + 3 * cbw * L));
    T* xin = buf + n;
    T* gin = xin + cbw * L;
    T* gout = gin + cbw * L;
    Cx* kf = detail::fft_scratch_complex<T>(static_cast<std::size_t>((2 * cbw + 2) * nf));
    Cx* acc = kf + cbw * nf;
    Cx* gf = acc + cbw * nf;
    Cx* xf = gf + nf;
#pragma omp for schedule(dynamic)
    for (Index blk = 0; blk < nblk; ++blk) {
      const Index d0 = blk * cbw, cb = std::min(cbw, D - d0);
      for (Index c = 0; c < cb; ++c) {
        detail::fft_circular_kernel(s, kl, d0 + c, n, inv_n, buf);
        fft.fwd(kf + c * nf, buf, n);
      }
      std::fill(acc, acc + cb * nf, Cx(0));
      for (Index b = 0; b < B; ++b) {
        detail::gather_channels(xm + b * L * D, L, D, d0, cb, xin);
        detail::gather_channels(dy + b * L * D, L, D, d0, cb, gin);
        for (Index c = 0; c < cb; ++c) {
          detail::fft_row(fft, gin + c * L, L, n, buf, gf);
          detail::fft_row(fft, xin + c * L, L, n, buf, xf);
          const Cx* k = kf + c * nf;
          Cx* a = acc + c * nf;
          for (Index i = 0; i < nf; ++i) {
            a[i] += gf[i] * std::conj(xf[i]);
            gf[i] *= std::conj(k[i]);
          }
          fft.inv(buf, gf, n);
          std::copy(buf, buf + L, gout + c * L);
        }
        detail::scatter_channels(gout, L, D, d0, cb, dxm + b * L * D);
      }
      // acc is the spectrum of the circular correlation of dy with xm: lag j at index j, lag -j at n-j.
      for (Index c = 0; c < cb; ++c) {
        fft.inv(buf, acc + c * nf, n);
        for (Index j = 0; j < K; ++j) dkl(j, d0 + c) = buf[j] * inv_n;
        if (s.bidirectional())
          for (Index j = 0; j < K; ++j) dkl.data()[j * R + D + d0 + c] = buf[(n - j) % n] * inv_n;
      }
    }
  }
}

template <class T>
void ema_conv_forward(EmaAlgo algo, const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, T* y, int threads) {
  if (algo == EmaAlgo::automatic) algo = ema_choose_algo(s, false, sizeof(T));
  if (algo == EmaAlgo::scan) return ema_conv_scan_forward(s, cf, xm, y, threads);
  const Matrix<T> kl = ema_kernel_lags(cf, s.kernel_size());
  if (algo == EmaAlgo::fft)
    ema_conv_fft_forward(s, kl, xm, y, threads);
  else
    ema_conv_direct_forward(s, kl, xm, y, threads);
}

template <class T>
void ema_conv_backward(EmaAlgo algo, const EmaShape& s, const EmaCoeffs<T>& cf, const T* xm, const T* dy, T* dxm,
                       EmaCoeffGrads<T>& g, int threads) {
  if (algo == EmaAlgo::automatic) algo = ema_choose_algo(s, true, sizeof(T));
  if (algo == EmaAlgo::scan) return ema_conv_scan_backward(s, cf, xm, dy, dxm, g, threads);
  const Matrix<T> kl = ema_kernel_lags(cf, s.kernel_size());
  Matrix<T> dkl;
  if (algo == EmaAlgo::fft)
    ema_conv_fft_backward(s, kl, xm, dy, dxm, dkl, threads);
  else
    ema_conv_direct_backward(s, kl, xm, dy, dxm, dkl, threads);
  ema_kernel_backward(cf, dkl, g);
}

template <class T>
void ema_forward(EmaAlgo algo, const EmaShape& s, const EmaParamsRef<T>& prm, const T* xm, T* y, int threads) {
  ema_check_shape(s, "ema_forward");
  const EmaCoeffs<T> cf = ema_coeffs(prm, s.rows(), s.order, s.kernel_size());
  ema_conv_forward(algo, s, cf, xm, y, threads);
}

template <class T>
void ema_backward(EmaAlgo algo, const EmaShape& s, const EmaParamsRef<T>& prm, const T* xm, const T* dy, T* dxm,
                  const EmaGradsRef<T>& grads, int threads) {
  ema_check_shape(s, "ema_backward");
  const EmaCoeffs<T> cf = ema_coeffs(prm, s.rows(), s.order, s.kernel_size());
  EmaCoeffGrads<T> g(s.order, s.rows());
  ema_conv_backward(algo, s, cf, xm, dy, dxm, g, threads);
  ema_coeffs_backward(cf, prm, g, grads);
}

}  // namespace ops
}  // namespace sma
