// sma_bench_cuda_stream: one streaming step of a causal SeqBoat layer on the device (SeqBoatLayerStreamerDevice) at
// the layer shape, D 512, Z 128, H 1024, N 16, W 256 (rotary, softmax, layernorm pre-norm), for B = 1, 16
// and 64 streams. Every stream's ring is filled first (300 steps with every token routed), then the steps are timed
// (median over `reps` runs of 50 steps, CUDA events) with every token routed, with the router's own decisions (the
// share routed is printed), and with none routed; each as plain launches and as a CUDA graph.
// Usage: sma_bench_cuda_stream [reps=7]
#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_stream_device.hpp>
#include <sma/models/seqboat.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace sma;

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const int reps = cuda::positive_arg(argc, argv, 1, 7);
  SeqBoatLayerConfig c;
  c.embed_dim = 512;
  c.zdim = 128;
  c.hdim = 1024;
  c.ndim = 16;
  c.window_size = 256;
  c.direction = Direction::causal;
  c.rel_pos = ops::PositionEncoding::rotary;
  c.attention_activation = ops::AttentionActivation::softmax;
  c.routing = RoutingSemantics::per_row;
  SeqBoatLayer<float> cpu(c, 1);
  cuda::SeqBoatLayerDevice dev = cuda::SeqBoatLayerDevice::from_cpu(cpu);
  const int steps = 50, D = static_cast<int>(c.embed_dim);
  std::printf("%4s %-8s %-6s %10s %12s %14s\n", "B", "routed", "graph", "share", "us/step", "tokens/s");
  for (const int B : {1, 16, 64}) {
    std::mt19937 rng(B);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> xh(static_cast<std::size_t>(B) * D);
    for (float& v : xh) v = nd(rng);
    cuda::DeviceArray<float> x(xh), y(xh.size());
    cuda::Stream s;
    for (const int mode : {0, 1, 2}) {  // every token routed, the router's decisions, none
      for (const bool graph : {false, true}) {
        cuda::SeqBoatLayerStreamerDevice st(dev, B);
        st.set_graph(graph);
        dev.set_router_shift(1000.f);
        for (int i = 0; i < 300; ++i) st.step(x.data(), y.data(), s.handle());
        dev.set_router_shift(mode == 0 ? 1000.f : mode == 1 ? 0.f : -1000.f);
        const auto before = st.download(s.handle()).activated;
        const float ms = cuda::time_median_ms(
            [&] {
              for (int i = 0; i < steps; ++i) st.step(x.data(), y.data(), s.handle());
            },
            s.handle(), reps, 1);
        const auto after = st.download(s.handle()).activated;
        double routed = 0;
        for (int b = 0; b < B; ++b) routed += static_cast<double>(after[b] - before[b]);
        const double share = routed / (static_cast<double>(B) * steps * (reps + 1));
        const double us = 1000.0 * ms / steps;
        std::printf("%4d %-8s %-6s %10.3f %12.2f %14.0f\n", B, mode == 0 ? "all" : mode == 1 ? "router" : "none",
                    graph ? "yes" : "no", share, us, B * 1e6 / us);
      }
    }
  }
  dev.set_router_shift(0.f);
  return 0;
}
