// sma/layers/router.hpp: the latent configurator, SeqBoat's router.
//
// WHAT     Turns M router logits per token into option probabilities with a learned temperature, picks an option
//          per token, and gives the gate that scales the chosen sub-module's output (ARCHITECTURE.md step 4).
// SHAPES   logits (N, M) with N = B*L tokens, row-major  ->  probs (N, M), choice (N), gate (N), active (B, L)
// PARAMS   temp (1): log temperature, initialised to log(init_temp_scale * sqrt(dim)) ("q_router.temp").
// FORWARD  probs = softmax(logits / exp(temp)); choice = argmax (ties go to option 0, like torch.max);
//          a token is ACTIVATED when choice == 1 and it is not padding; gate = max(probs) if activated else 0.
// GRADIENT The argmax is not differentiated. d gate reaches the logits and `temp` through max(probs) only
//          (docs/maths/router.md): dz = p ⊙ (e_c·dg - p_c·dg) / tau, dtemp = -sum(dz_scaled ⊙ logits / tau).
// ROUTING  Decisions are taken in the scalar type (float or wider; never bf16). With ctx.freeze_routing and a
//          Cache that already holds decisions of the same shape, those are reused (gradient checks).
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace sma {

template <class T>
class LatentConfigurator {
 public:
  using Scalar = T;
  struct Config {
    Index dim = 0;               ///< model width D (only sets the initial temperature)
    Index options = 2;           ///< M; option 1 is "run the sub-module", option 0 "skip"
    double init_temp_scale = 1.0;
  };
  struct Cache {
    Matrix<T> probs;                  ///< (N, M)
    std::vector<std::uint8_t> choice; ///< (N)
    std::vector<T> gate;              ///< (N): p_max for activated tokens, else 0
    Tensor2<std::uint8_t> active;     ///< (B, L)
  };

  LatentConfigurator() = default;
  explicit LatentConfigurator(Config cfg) : cfg_(cfg), temp_("temp", {1}) {
    if (cfg_.options < 2) throw ValueError(str_cat("LatentConfigurator: options must be >= 2, got ", cfg_.options));
    if (cfg_.dim < 1) throw ValueError(str_cat("LatentConfigurator: dim must be >= 1, got ", cfg_.dim));
    if (!(cfg_.init_temp_scale > 0))
      throw ValueError(str_cat("LatentConfigurator: init_temp_scale must be > 0, got ", cfg_.init_temp_scale));
    reset_parameters();
  }

  const Config& config() const { return cfg_; }
  void reset_parameters() { temp_.data()[0] = static_cast<T>(std::log(cfg_.init_temp_scale * std::sqrt(double(cfg_.dim)))); }

  template <class V>
  void visit_params(V&& v) {
    v("temp", temp_);
  }

  /// Routes B*L tokens from their logits (N, M). `padding` (B, L) or nullptr.
  void forward(const Context& ctx, CMatrixMap<T> logits, Index batch, Index length, Cache& cache) const {
    const Index n = batch * length;
    if (logits.rows() != n || logits.cols() != cfg_.options)
      throw ShapeError(str_cat("LatentConfigurator: logits must be (", n, ", ", cfg_.options, "), got (",
                               logits.rows(), ", ", logits.cols(), ")"));
    const Mask* pad = ctx.padding_for(batch, length, "LatentConfigurator");
    const bool reuse = ctx.freeze_routing && static_cast<Index>(cache.choice.size()) == n &&
                       cache.active.dimension(0) == batch && cache.active.dimension(1) == length;
    const T inv_tau = static_cast<T>(std::exp(-double(temp_.data()[0])));
    cache.probs.resize(n, cfg_.options);
    if (!reuse) {
      cache.choice.assign(static_cast<std::size_t>(n), 0);
      cache.active = Tensor2<std::uint8_t>(batch, length);
    }
    cache.gate.assign(static_cast<std::size_t>(n), T(0));
    for (Index i = 0; i < n; ++i) {
      T mx = logits(i, 0) * inv_tau;
      for (Index m = 1; m < cfg_.options; ++m) mx = std::max(mx, logits(i, m) * inv_tau);
      T sum = 0;
      for (Index m = 0; m < cfg_.options; ++m) {
        const T e = std::exp(logits(i, m) * inv_tau - mx);
        cache.probs(i, m) = e;
        sum += e;
      }
      cache.probs.row(i) /= sum;
      if (!reuse) {
        Index best = 0;
        for (Index m = 1; m < cfg_.options; ++m)
          if (cache.probs(i, m) > cache.probs(i, best)) best = m;
        const Index b = i / length, t = i % length;
        cache.choice[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(best);
        cache.active(b, t) = (best == 1 && !is_padding(pad, b, t)) ? 1 : 0;
      }
      const Index b = i / length, t = i % length;
      if (cache.active(b, t)) cache.gate[static_cast<std::size_t>(i)] = cache.probs(i, cache.choice[static_cast<std::size_t>(i)]);
    }
  }

  /// Given d gate (N) (only activated entries are read), returns d logits (N, M) and adds to d temp.
  Matrix<T> backward(CMatrixMap<T> logits, const std::vector<T>& dgate, const Cache& cache) {
    const Index n = logits.rows(), m_opts = cfg_.options;
    const Index length = cache.active.dimension(1);
    const T inv_tau = static_cast<T>(std::exp(-double(temp_.data()[0])));
    Matrix<T> dlogits = Matrix<T>::Zero(n, m_opts);
    T dtemp = 0;
    for (Index i = 0; i < n; ++i) {
      if (!cache.active(i / length, i % length)) continue;
      const Index c = cache.choice[static_cast<std::size_t>(i)];
      const T pc = cache.probs(i, c), dg = dgate[static_cast<std::size_t>(i)];
      for (Index m = 0; m < m_opts; ++m) {
        // d p_c / d s_m = p_c (delta_cm - p_m), with s = logits / tau.
        const T ds = dg * pc * ((m == c ? T(1) : T(0)) - cache.probs(i, m));
        dlogits(i, m) = ds * inv_tau;
        dtemp -= ds * logits(i, m) * inv_tau;  // d s_m / d temp = -logits_m / tau
      }
    }
    temp_.grad()[0] += dtemp;
    return dlogits;
  }

 private:
  Config cfg_;
  Param<T> temp_;
};

}  // namespace sma
