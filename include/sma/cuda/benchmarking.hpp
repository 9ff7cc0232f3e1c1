// sma/cuda/benchmarking.hpp: what the device benchmarks share: the start of their mains (no device: say so and stop;
// else name the device), their integer arguments, the precision modes, the median of CUDA-event timings of a
// callable, a training step timed as a replayed CUDA graph, the share of tokens a device layer routed, and steering
// its router to a target share.
// Host header, no CUDA header (definitions inline over sma::cuda's host API).
#pragma once

#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_device.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace sma::cuda {

/// The start of a benchmark's main: without a CUDA device prints "no CUDA device: nothing to time" and returns
/// false (the main returns 0: a machine without a GPU is not an error); else prints "device <description>".
inline bool announce_device() {
  if (device_count() == 0) {
    std::printf("no CUDA device: nothing to time\n");
    return false;
  }
  std::printf("device %s\n", device_description().c_str());
  return true;
}

/// argv[i] as an integer, at least 1; `fallback` when there are fewer arguments.
inline int positive_arg(int argc, char** argv, int i, int fallback) {
  return argc > i ? std::max(1, std::atoi(argv[i])) : fallback;
}

/// The precisions the model benchmarks compare: mode 0 fp32, 1 bf16 projections, 2 bf16 projections and bf16
/// attention. Sets `mode` on `dev` (a device layer or model: set_bf16_projections, set_bf16_attention) and returns
/// its name for the printed line.
template <class DeviceModel>
const char* set_precision(DeviceModel& dev, int mode) {
  dev.set_bf16_projections(mode >= 1);
  dev.set_bf16_attention(mode == 2);
  return mode == 0 ? "fp32" : mode == 1 ? "bf16-projections" : "bf16-projections+bf16-attention";
}

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

/// The training step `step` of `dev` timed again as a replayed CUDA graph (set_step_graph; `plain_ms` is its plain
/// median), then the graph switched off; prints one line "<what> <prec> B=.. L=.. graph-step .. against plain .."
/// with the graph's counts and the loss of a plain and of a replayed step (equal when the graph is exact at lr 0).
template <class DeviceModel>
void time_step_graph(DeviceModel& dev, const std::function<void()>& step, void* stream, int reps, float plain_ms,
                     const char* what, const char* prec, int B, int L) {
  step();
  const double loss_plain = dev.read_loss(stream).loss;
  dev.set_step_graph(true);
  // warm-up: a plain step (the first at this shape with the graph on), the capture, a replay
  const float t_graph = time_median_ms(step, stream, reps, 3);
  const auto gs = dev.step_graph_stats();
  const double loss_graph = dev.read_loss(stream).loss;
  dev.set_step_graph(false);
  std::printf("%s %s B=%d L=%d graph-step %.3f ms against plain %.3f ms (median of %d; %lld plain, %lld captures, "
              "%lld replays) | loss plain %.9g graph %.9g (lr 0, no dropout: equal when the graph is exact)\n",
              what, prec, B, L, t_graph, plain_ms, reps, gs.plain, gs.captures, gs.replays, loss_plain, loss_graph);
}

/// The share of the last forward's B*L tokens that the layer routed to the attention (waits for `stream`).
inline double routed_share(const SeqBoatLayerDevice& layer, void* stream = nullptr) {
  const std::vector<std::uint8_t> a = layer.active(stream);
  double on = 0;
  for (auto v : a) on += v;
  return on / static_cast<double>(std::max<std::size_t>(a.size(), 1));
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
    got = routed_share(layer, stream);
    if (target >= 1.0 || std::abs(got - target) < tolerance) break;
    (got < target ? lo : hi) = shift;
  }
  return got;
}

}  // namespace sma::cuda
