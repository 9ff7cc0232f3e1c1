// bench/bench_cuda_layer.cpp: the whole SeqBoat layer on the GPU (sma::cuda::SeqBoatLayerDevice), forward and
// forward+backward, timed with CUDA events as Google Benchmark manual time, at the shape of issue 7: D 512, Z 128,
// H 1024, N 16, W 256, relu2, causal, layernorm pre-norm, 65,536 tokens per batch (B = 65536 / L) for L = 1K .. 64K,
// rotary positions (and the simple bias with P = L at L = 64K), at densities 0.1 / 0.5 / 1.0.
//
// Names read  cuda_layer/<fwd|fwd_bwd>/<precision>/<position>/L:<L>/density%:<p>; precision is
//   fp32  every op in fp32;
//   bf16  the three projections and the attention on tensor cores (bf16 operands, fp32 accumulation; the EMA,
//         norms, router logits and all stored activations stay fp32).
// Nothing waits for the host: the products after compression run on the B*L bound (host_compressed_length off).
// Counters: density (measured share of routed tokens), tok/s, TFLOP/s (bench::layer_flops; forward+backward
// counts 3x the forward), MiB (device memory the layer holds after a forward+backward, plus the peak of its
// temporaries in the default pool). Run with --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
// for medians; docs/benchmarks.md has the tables and the command.
#include "bench_common.hpp"

#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_layer.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using namespace sma;

constexpr int kTokens = 65536;

enum class Mode { fwd, fwd_bwd };
enum class Precision { fp32, bf16 };

SeqBoatLayerConfig issue_config(Index L, ops::PositionEncoding pos) {
  SeqBoatLayerConfig c;
  c.embed_dim = 512;
  c.zdim = 128;
  c.hdim = 1024;
  c.ndim = 16;
  c.window_size = 256;
  c.direction = Direction::causal;
  c.attention_activation = ops::AttentionActivation::relu2;
  c.rel_pos = pos;
  c.max_positions = L;
  c.norm_type = NormType::layernorm;
  c.prenorm = true;
  return c;
}

/// The device copy of a CPU layer, with the projections and the attention on tensor cores for bf16.
cuda::SeqBoatLayerDevice make_layer(const SeqBoatLayerConfig& lc, Precision precision) {
  SeqBoatLayer<float> cpu(lc, 7);
  cuda::SeqBoatLayerDevice dev = cuda::SeqBoatLayerDevice::from_cpu(cpu);
  dev.set_bf16_projections(precision == Precision::bf16);
  dev.set_bf16_attention(precision == Precision::bf16);
  return dev;
}

std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& e : v) e = d(rng);
  return v;
}

void layer_bench(benchmark::State& state, Mode mode, Precision precision, ops::PositionEncoding pos) {
  if (cuda::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int L = static_cast<int>(state.range(0)), B = kTokens / L;
  const double target = double(state.range(1)) / 100.0;
  const SeqBoatLayerConfig lc = issue_config(L, pos);
  const std::size_t n = static_cast<std::size_t>(kTokens) * 512;

  cuda::Stream stream;
  void* s = stream.handle();
  cuda::DeviceArray<float> x(random_vector(n, 1)), dy(random_vector(n, 2)), out(n), dx(n);
  cuda::device_synchronize();
  cuda::reset_pool_peak();
  const cuda::DeviceMemory before = cuda::device_memory();

  cuda::SeqBoatLayerDevice dev = make_layer(lc, precision);
  const double density = cuda::steer_density(dev, B, L, x.data(), out.data(), target, s);
  auto once = [&] {
    dev.forward(B, L, x.data(), nullptr, out.data(), s);
    if (mode == Mode::fwd_bwd) dev.backward(dy.data(), dx.data(), s);
  };
  once();
  once();
  stream.synchronize();
  const cuda::DeviceMemory after = cuda::device_memory();

  cuda::EventTimer timer;
  for (auto _ : state) {
    timer.start(s);
    once();
    state.SetIterationTime(double(timer.stop(s)) / 1e3);
  }

  // What the layer holds (its cudaMalloc'd parameters, gradients and saved activations) plus the peak of the
  // temporaries it took from the pool.
  const double held = double(after.used - after.pool_reserved) - double(before.used - before.pool_reserved);
  const double temporaries = double(after.pool_used_peak);
  const double flops = bench::layer_flops(lc, B, L, density).total() * (mode == Mode::fwd_bwd ? 3.0 : 1.0);
  state.counters["density"] = density;
  state.counters["tok/s"] = benchmark::Counter(double(kTokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["TFLOP/s"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["MiB"] = (held + temporaries) / (1024.0 * 1024.0);
  state.SetLabel(cuda::device_description(0));
}

void register_all() {
  struct PosCase {
    ops::PositionEncoding pos;
    const char* name;
    std::vector<int> lengths;
  };
  const PosCase cases[] = {{ops::PositionEncoding::rotary, "rotary", {1024, 4096, 16384, 65536}},
                           {ops::PositionEncoding::simple, "simple", {65536}}};
  for (Mode mode : {Mode::fwd, Mode::fwd_bwd})
    for (Precision precision : {Precision::fp32, Precision::bf16})
      for (const PosCase& pc : cases) {
        const std::string name = std::string("cuda_layer/") + (mode == Mode::fwd ? "fwd" : "fwd_bwd") + "/" +
                                 (precision == Precision::fp32 ? "fp32" : "bf16") + "/" + pc.name;
        auto* b = benchmark::RegisterBenchmark(name.c_str(), layer_bench, mode, precision, pc.pos);
        b->ArgNames({"L", "density%"})->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);
        for (int L : pc.lengths)
          for (int d : {10, 50, 100}) b->Args({L, d});
      }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  ::benchmark::Initialize(&argc, argv);
  if (::benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  ::benchmark::RunSpecifiedBenchmarks();
  ::benchmark::Shutdown();
  return 0;
}
