// sma/cuda/benchmarking.hpp: what timing a device op and comparing sparse with dense activation need: the median of
// CUDA-event timings of a callable, and steering a device layer's router to a target share of routed tokens.
// Host header, no CUDA header (definitions inline over sma::cuda's host API).
#pragma once

#include <sma/cuda/buffer.hpp>
#include <sma/cuda/seqboat_device.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace sma::cuda {

/// Milliseconds of `fn` (work queued on `stream`): `warmup` untimed calls, then the median of `reps` calls, each
/// timed between two CUDA events on the stream.
inline float time_median_ms(const std::function<void()>& fn, void* stream, int reps, int warmup = 2) {
  EventTimer timer;
  for (int i = 0; i < warmup; ++i) fn();
  device_synchronize();
  std::vector<float> t;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    timer.start(stream);
    fn();
    t.push_back(timer.stop(stream));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// Sets the layer's router shift so that about `target` of the B*L tokens of x (device, (B, L, D)) are routed to
/// the attention: bisection on the measured share, to within `tolerance`, over at most 24 forwards (which write
/// `out`, (B, L, D)); a target >= 1 takes a shift that routes every token. Returns the share reached. The shift is
/// the same one SeqBoatLayerConfig::router_shift applies on the CPU, as the reference benchmark shifts hx_proj.bias.
inline double steer_density(SeqBoatLayerDevice& layer, int batch, int length, const float* x, float* out,
                            double target, void* stream = nullptr, double tolerance = 0.01) {
  double lo = -40, hi = 40, got = 0;
  for (int it = 0; it < 24; ++it) {
    const double shift = target >= 1.0 ? 1000.0 : 0.5 * (lo + hi);
    layer.set_router_shift(static_cast<float>(shift));
    layer.forward(batch, length, x, nullptr, out, stream);
    const std::vector<std::uint8_t> a = layer.active(stream);
    got = 0;
    for (auto v : a) got += v;
    got /= static_cast<double>(std::max<std::size_t>(a.size(), 1));
    if (target >= 1.0 || std::abs(got - target) < tolerance) break;
    (got < target ? lo : hi) = shift;
  }
  return got;
}

}  // namespace sma::cuda
