// sma/testing/random.hpp: seeded random tensors and parameters for tests, examples and benchmarks.
#pragma once

#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <array>
#include <cstdint>
#include <random>
#include <string>

namespace sma::testing {

/// Uniform in [lo, hi), deterministic for a given seed.
template <class T, int R>
Tensor<T, R> random_uniform(const std::array<Index, R>& dims, std::uint64_t seed, T lo = T(-1), T hi = T(1)) {
  Tensor<T, R> t(dims);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(static_cast<double>(lo), static_cast<double>(hi));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(u(rng));
  return t;
}

/// Normal(mean, std), deterministic for a given seed.
template <class T, int R>
Tensor<T, R> random_normal(const std::array<Index, R>& dims, std::uint64_t seed, T mean = T(0), T std = T(1)) {
  Tensor<T, R> t(dims);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(static_cast<double>(mean), static_cast<double>(std));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(n(rng));
  return t;
}

/// Shorthand for the common (B, L, D) input.
template <class T>
Tensor3<T> random_tensor(Index b, Index l, Index d, std::uint64_t seed, T scale = T(1)) {
  return random_normal<T, 3>({b, l, d}, seed, T(0), scale);
}

/// Overwrites every trainable Param of `model` with Normal(0, scale) values (buffers are left alone).
template <class Model>
void randomize_params(Model& model, std::uint64_t seed, double scale = 0.5) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, scale);
  for_each_param(model, [&](const std::string&, auto& p) {
    if (!p.trainable()) return;
    using T = typename std::decay_t<decltype(p)>::Scalar;
    for (Index i = 0; i < p.size(); ++i) p.data()[i] = static_cast<T>(n(rng));
  });
}

/// A padding mask (B, L) where row b keeps its first lengths[b] positions (1 = padded after them).
inline Mask padding_from_lengths(const std::vector<Index>& lengths, Index L) {
  Mask m(static_cast<Index>(lengths.size()), L);
  for (Index b = 0; b < m.dimension(0); ++b)
    for (Index t = 0; t < L; ++t) m(b, t) = t >= lengths[static_cast<std::size_t>(b)] ? 1 : 0;
  return m;
}

}  // namespace sma::testing
