// sma_bench_cuda_lm_stream: streaming decode of the causal SeqBoat LM on the device (SeqBoatLmStreamerDevice) at the
// LM shape of sma_bench_cuda_lm: V 256, D 256, 4 layers (H 512, Z 128, N 16, W 256, simple bias, softmax, layernorm
// pre-norm) each with a silu feed-forward block of 512; random initial weights, so the router's own decisions (the
// share routed is printed). For B = 1, 16 and 64 streams: 300 steps first (the rings fill), then `steps` steps
// timed (median over `reps` runs, CUDA events), as plain launches and as a CUDA graph; then greedy generation of
// `steps` tokens (argmax on the device, the graph on; one read-back at the end).
// Usage: sma_bench_cuda_lm_stream [reps=7] [steps=50]
#include "bench_lm_config.hpp"

#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_lm.hpp>
#include <sma/cuda/seqboat_lm_stream_device.hpp>
#include <sma/models/lm.hpp>

#include <cstdio>
#include <random>
#include <vector>

using namespace sma;

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const int reps = cuda::positive_arg(argc, argv, 1, 7);
  const int steps = cuda::positive_arg(argc, argv, 2, 50);
  const SeqBoatLmConfig c = cuda_bench::bench_lm_config();
  SeqBoatLm<float> cpu(c, 1);
  cuda::SeqBoatLmDevice lm = cuda::SeqBoatLmDevice::from_cpu(cpu);
  const int V = static_cast<int>(c.vocab_size);
  std::printf("%4s %-9s %8s %12s %14s\n", "B", "mode", "routed", "us/step", "tokens/s");
  for (const int B : {1, 16, 64}) {
    std::mt19937 rng(B);
    std::vector<int> th(static_cast<std::size_t>(B));
    for (int& t : th) t = static_cast<int>(rng() % V);
    cuda::DeviceArray<int> tok(th);
    cuda::DeviceArray<float> logits(static_cast<std::size_t>(B) * V);
    cuda::Stream stream;
    void* s = stream.handle();
    for (const bool graph : {false, true}) {
      cuda::SeqBoatLmStreamerDevice st(lm, B);
      st.set_graph(graph);
      for (int i = 0; i < 300; ++i) st.step(tok.data(), logits.data(), s);
      const auto before = st.layer_streamer(0).download(s).activated;
      const float ms = cuda::time_median_ms(
          [&] {
            for (int i = 0; i < steps; ++i) st.step(tok.data(), logits.data(), s);
          },
          s, reps, 1);
      const auto after = st.layer_streamer(0).download(s).activated;
      double routed = 0;
      for (int b = 0; b < B; ++b) routed += static_cast<double>(after[b] - before[b]);
      const double share = routed / (static_cast<double>(B) * steps * (reps + 1));
      const double us = 1000.0 * ms / steps;
      std::printf("%4d %-9s %8.3f %12.2f %14.0f\n", B, graph ? "graph" : "plain", share, us, B * 1e6 / us);
    }
    cuda::SeqBoatLmStreamerDevice st(lm, B);
    st.set_graph(true);
    for (int i = 0; i < 300; ++i) st.step(tok.data(), logits.data(), s);
    const float ms = cuda::time_median_ms([&] { st.generate(th, steps, s); }, s, reps, 1);
    const double us = 1000.0 * ms / steps;
    std::printf("%4d %-9s %8s %12.2f %14.0f\n", B, "generate", "-", us, B * 1e6 / us);
  }
  return 0;
}
