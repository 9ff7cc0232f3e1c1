// sma/ops/rel_pos.hpp: relative position encodings of SeqBoat's local attention (ARCHITECTURE.md §1 step 8).
//
// WHAT
//   - `simple` (FastRelativePositionalBias): a learned table w of 2P-1 entries, P = max_positions. The bias between
//     a query at ORIGINAL position p_i and a key at original position p_j is w[clamp(P-1 + p_j - p_i, 0, 2P-2)].
//     The reference materialises an L x L matrix; here the index is computed per visible pair.
//   - `local_simple` (the reference's local_pos=True): a table of 6W-1 entries indexed by COMPRESSED slot indices,
//     bias = w[4W-1 + j - i] (only the 2W+1 or W+1 entries around 4W-1 are ever used).
//   - `rotary`: the pair (x[2m], x[2m+1]) of a query or key row is rotated, as a complex number, by the angle
//     pos * theta^(-2m/Z), pos = original 0-based position, theta = 1e4 in SeqBoat (precompute_freqs_cis and
//     apply_rotary_emb of the reference). The rotation is orthogonal, so the backward rotates by -angle.
// Derivations and the blocking scheme that uses these helpers: docs/maths/local_attention.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>
#include <sma/core/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sma::ops {

/// Index into the `simple` table (2P-1 entries) for a query at original position `pos_q` and a key at `pos_k`.
inline Index simple_bias_index(Index max_positions, std::int64_t pos_q, std::int64_t pos_k) {
  const std::int64_t r = static_cast<std::int64_t>(max_positions) - 1 + (pos_k - pos_q);
  return static_cast<Index>(std::clamp<std::int64_t>(r, 0, 2 * static_cast<std::int64_t>(max_positions) - 2));
}

/// Index into the `local_simple` table (6W-1 entries) for query slot `slot_q` and key slot `slot_k`, which must
/// be at most W apart (the reference's window guarantees it).
inline Index local_bias_index(Index window, Index slot_q, Index slot_k) { return 4 * window - 1 + slot_k - slot_q; }

/// The reference's FastRelativePositionalBias(L) as an explicit L x L matrix, M(i, j) = w[clamp(P-1 + j - i)].
/// For tests and small L only: the attention never builds it.
template <class T>
Matrix<T> simple_bias_matrix(const T* table, Index max_positions, Index length) {
  if (max_positions < 1) throw ValueError(str_cat("simple_bias_matrix: max_positions must be >= 1, got ", max_positions));
  if (length < 0) throw ValueError(str_cat("simple_bias_matrix: length must be >= 0, got ", length));
  Matrix<T> m(length, length);
  for (Index i = 0; i < length; ++i)
    for (Index j = 0; j < length; ++j) m(i, j) = table[simple_bias_index(max_positions, i, j)];
  return m;
}

/// theta^(-2m/Z) for m = 0..Z/2-1, computed as the reference does (1 / theta^(2m/Z)), in double.
inline std::vector<double> rotary_inverse_frequencies(Index z, double theta) {
  if (z < 2 || z % 2 != 0) throw ValueError(str_cat("rotary: the width must be even and >= 2, got ", z));
  if (!(theta > 0)) throw ValueError(str_cat("rotary: theta must be > 0, got ", theta));
  std::vector<double> f(static_cast<std::size_t>(z / 2));
  for (Index m = 0; m < z / 2; ++m)
    f[static_cast<std::size_t>(m)] = 1.0 / std::pow(theta, static_cast<double>(2 * m) / static_cast<double>(z));
  return f;
}

namespace detail {

// Rotates row r of x (and of y when given; both (rows, z), contiguous row-major) by sign * positions[r] * f_m.
// Angles are formed in double whatever T is. For float, they are reduced to [-pi, pi] in double and their cosine and
// sine taken by Eigen's vectorised float functions (accurate to a few float ulps, and much cheaper than libm).
template <class T>
void rotary_apply(T* x, T* y, Index rows, Index z, const std::int64_t* positions, double theta, double sign,
                  int threads) {
  const std::vector<double> f = rotary_inverse_frequencies(z, theta);
  const Index half = z / 2;
#pragma omp parallel num_threads(threads) if (threads > 1 && rows * z > (1 << 14))
  {
    Eigen::ArrayXd angle(half);
    Eigen::Array<T, Eigen::Dynamic, 1> c(half), s(half);
#pragma omp for schedule(static)
    for (Index r = 0; r < rows; ++r) {
      const double p = sign * static_cast<double>(positions[r]);
      for (Index m = 0; m < half; ++m) angle[m] = p * f[static_cast<std::size_t>(m)];
      if constexpr (std::is_same<T, float>::value) {
        constexpr double two_pi = 6.283185307179586476925;
        const Eigen::ArrayXf reduced = (angle - two_pi * (angle / two_pi).round()).cast<float>();
        c = reduced.cos();
        s = reduced.sin();
      } else {
        for (Index m = 0; m < half; ++m) {
          c[m] = static_cast<T>(std::cos(angle[m]));
          s[m] = static_cast<T>(std::sin(angle[m]));
        }
      }
      for (T* v : {x + r * z, y ? y + r * z : nullptr}) {
        if (!v) continue;
        for (Index m = 0; m < half; ++m) {
          const T v0 = v[2 * m], v1 = v[2 * m + 1];
          v[2 * m] = v0 * c[m] - v1 * s[m];
          v[2 * m + 1] = v0 * s[m] + v1 * c[m];
        }
      }
    }
  }
}

inline int rotary_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

}  // namespace detail

/// Rotates every row of `x` (rows, Z) in place by its position's angles; `inverse` rotates by minus the angles,
/// which is the transpose (and the backward) of the forward rotation. `threads` 0 = OpenMP's default.
template <class T>
void apply_rotary(Matrix<T>& x, const std::vector<std::int64_t>& positions, double theta = 10000.0,
                  bool inverse = false, int threads = 0) {
  if (static_cast<Index>(positions.size()) != x.rows())
    throw ShapeError(str_cat("apply_rotary: ", positions.size(), " positions for ", x.rows(), " rows"));
  detail::rotary_apply<T>(x.data(), nullptr, x.rows(), x.cols(), positions.data(), theta, inverse ? -1.0 : 1.0,
                          detail::rotary_threads(threads));
}

}  // namespace sma::ops
