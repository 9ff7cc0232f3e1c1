// sma/core/init.hpp: parameter initialisers shared by the layers (seeded, so models are reproducible).
#pragma once

#include <sma/core/param.hpp>

#include <cstdint>
#include <random>

namespace sma::init {

/// Normal(mean, std) truncated to [mean - 2 std, mean + 2 std] by rejection: the reference's `Normal` helper
/// (torch.nn.init.trunc_normal_ with a = -2 std, b = 2 std).
template <class T>
void truncated_normal(Param<T>& p, double mean, double std, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  for (Index i = 0; i < p.size(); ++i) {
    double z;
    do z = n(rng);
    while (z < -2.0 || z > 2.0);
    p.data()[i] = static_cast<T>(mean + std * z);
  }
}

/// Uniform in [lo, hi).
template <class T>
void uniform(Param<T>& p, double lo, double hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(lo, hi);
  for (Index i = 0; i < p.size(); ++i) p.data()[i] = static_cast<T>(u(rng));
}

}  // namespace sma::init
