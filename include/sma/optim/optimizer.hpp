// sma/optim/optimizer.hpp: what every optimiser shares: the flat trainable view of a ParamBuffer, gradient
// clipping by global norm, and learning-rate schedules (linear warm-up, then linear or cosine decay).
#pragma once

#include <sma/core/param.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace sma::optim {

/// The trainable slices of a ParamBuffer (buffers such as BatchNorm running statistics are excluded), and which
/// of them take weight decay.
template <class T>
struct TrainableView {
  struct Range {
    Index offset, size;
    bool decay;
  };
  std::vector<Range> ranges;
  Index total = 0;

  TrainableView() = default;
  /// `decay(name)` says whether a parameter takes weight decay (default: all).
  template <class DecayPred>
  TrainableView(const ParamBuffer<T>& buf, DecayPred decay) {
    for (const auto& e : buf.entries()) {
      if (!e.param->trainable()) continue;
      ranges.push_back({e.offset, e.param->size(), decay(e.name)});
      total += e.param->size();
    }
  }
  explicit TrainableView(const ParamBuffer<T>& buf) : TrainableView(buf, [](const std::string&) { return true; }) {}
};

/// Scales all trainable gradients so that their global L2 norm is at most `max_norm` (no-op when max_norm <= 0).
/// Returns the norm before clipping (the number worth logging).
template <class T>
double clip_grad_norm(ParamBuffer<T>& buf, double max_norm) {
  double sq = 0;
  for (const auto& e : buf.entries()) {
    if (!e.param->trainable()) continue;
    const T* g = buf.grads() + e.offset;
    for (Index i = 0; i < e.param->size(); ++i) sq += double(g[i]) * double(g[i]);
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const T scale = static_cast<T>(max_norm / (norm + 1e-6));
    for (const auto& e : buf.entries()) {
      if (!e.param->trainable()) continue;
      T* g = buf.grads() + e.offset;
      for (Index i = 0; i < e.param->size(); ++i) g[i] *= scale;
    }
  }
  return norm;
}

enum class Decay { constant, linear, cosine };

inline Decay parse_decay(const std::string& s) {
  if (s == "constant") return Decay::constant;
  if (s == "linear") return Decay::linear;
  if (s == "cosine") return Decay::cosine;
  throw ValueError(str_cat("unknown learning-rate decay '", s, "' (expected constant, linear or cosine)"));
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then decay to `peak * final_ratio` at `total` steps.
struct Schedule {
  double peak = 1e-3;
  Index warmup = 0;
  Index total = 1;
  Decay decay = Decay::cosine;
  double final_ratio = 0.0;

  double lr(Index step) const {  // step counts from 0
    if (warmup > 0 && step < warmup) return peak * double(step + 1) / double(warmup);
    if (decay == Decay::constant || total <= warmup) return peak;
    const double progress = std::min(1.0, double(step - warmup) / double(std::max<Index>(1, total - warmup)));
    const double lo = peak * final_ratio;
    if (decay == Decay::linear) return lo + (peak - lo) * (1.0 - progress);
    return lo + (peak - lo) * 0.5 * (1.0 + std::cos(M_PI * progress));
  }
};

}  // namespace sma::optim
