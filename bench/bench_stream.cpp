// bench/bench_stream.cpp: per-token latency of streaming decode (SeqBoatLayerStreamer::step) at positions 1K, 16K and
// 256K for a D = 256 causal SeqBoat layer, and the state's size. Results and how to run: docs/benchmarks.md,
// section "Streaming".
//
// The layer: D 256, zdim 64, hdim 512, ndim 16, window W 256, relu2, simple relative bias (max_positions 1024),
// layernorm pre-norm, no EMA truncation; float; one stream (B = 1); one thread.
// How the position is reached: by really streaming. One stream is fed 256K random tokens in chunks of 1024
// (step_chunk, the same code path) with the layer's own routing; the states at 1K, 16K and 256K are kept. Each
// benchmark repetition copies the kept state and times 256 single-token steps from there, with the router forced
// ("all": every token activated, so each step attends over W + 1 = 257 keys; "none": no token activated, so a
// step costs the norm, EMA, hx_proj and router only) or left alone ("routed": the layer's own decisions).
// The baseline BM_FullForwardPerToken is what decoding costs without a state: the full forward over the last L
// tokens for each new token.
// Run: OPENBLAS_NUM_THREADS=1 sma_bench_stream (the timed steps are single-threaded; Eigen may hand large products
// to OpenBLAS, whose own threads would otherwise spin next to them).
#include <sma/models/seqboat_stream.hpp>
#include <sma/testing/random.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace sma;
using T = float;

constexpr Index kDim = 256;
constexpr Index kSteps = 256;  // timed steps per repetition

SeqBoatLayerConfig stream_config() {
  SeqBoatLayerConfig c;
  c.embed_dim = kDim;
  c.zdim = 64;
  c.hdim = 2 * kDim;
  c.ndim = 16;
  c.window_size = 256;
  c.direction = Direction::causal;
  c.attention_activation = ops::AttentionActivation::relu2;
  c.rel_pos = ops::PositionEncoding::simple;
  c.max_positions = 1024;
  c.norm_type = NormType::layernorm;
  c.prenorm = true;
  c.routing = RoutingSemantics::per_row;
  return c;
}

/// The benchmarked layer: the reference initialisation (seed 7) with the router's weights widened (its logits are
/// near 0 at initialisation; this makes routing a real decision, about 2/3 of the tokens activated).
SeqBoatLayer<T> make_layer() {
  SeqBoatLayer<T> layer(stream_config(), 7);
  auto& w = layer.hx_proj().weight();
  for (Index j = 0; j < 2 * kDim; ++j) w.data()[j] *= T(50);
  return layer;
}

void single_threaded() {
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
}

struct Fixture {
  SeqBoatLayer<T> layer = make_layer();
  std::map<Index, SeqBoatLayerState<T>> states;  // position -> state of one stream
  Tensor3<T> tokens;                              // (1, 64, D) inputs cycled through by the timed steps
  double seconds_to_fill = 0;
  double density = 0;

  Fixture() {
    single_threaded();
    tokens = testing::random_tensor<T>(1, 64, kDim, 99);
    SeqBoatLayerStreamer<T> s(layer);
    auto st = s.make_state(1);
    const auto t0 = std::chrono::steady_clock::now();
    Index pos = 0;
    for (Index target : {Index(1) << 10, Index(16) << 10, Index(256) << 10}) {
      while (pos < target) {
        const Tensor3<T> chunk = testing::random_tensor<T>(1, 1024, kDim, 1000 + static_cast<std::uint64_t>(pos));
        s.step_chunk(chunk, st);
        pos += 1024;
      }
      states[target] = st;
    }
    seconds_to_fill = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    density = double(st.activated[0]) / double(st.position[0]);
    std::fprintf(stderr, "streamed 256K tokens to build the states in %.1f s (routed density %.3f)\n", seconds_to_fill,
                 density);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

// Args: position, mode (0 routed, 1 all, 2 none).
void BM_StreamStep(benchmark::State& bs) {
  Fixture& f = fixture();
  const Index position = bs.range(0);
  const int mode = static_cast<int>(bs.range(1));
  f.layer.config().router_shift = mode == 1 ? 1e4 : mode == 2 ? -1e4 : 0.0;
  SeqBoatLayerStreamer<T> s(f.layer);
  auto st = f.states.at(position);
  const std::int64_t active0 = st.activated[0];
  Tensor2<T> x(1, kDim);
  Index i = 0;
  for (auto _ : bs) {
    const T* src = f.tokens.data() + (i++ % 64) * kDim;
    std::copy(src, src + kDim, x.data());
    benchmark::DoNotOptimize(s.step(x, st));
  }
  bs.counters["position"] = double(position);
  bs.counters["state_bytes"] = double(st.bytes());
  bs.counters["density"] = double(st.activated[0] - active0) / double(bs.iterations());
  bs.SetLabel(mode == 1 ? "all activated" : mode == 2 ? "none activated" : "routed");
  f.layer.config().router_shift = 0.0;
}

// Without a state: the next token's output from the full forward over the last L tokens.
void BM_FullForwardPerToken(benchmark::State& bs) {
  single_threaded();
  static const SeqBoatLayer<T> layer = make_layer();
  const Index L = bs.range(0);
  const Tensor3<T> x = testing::random_tensor<T>(1, L, kDim, 5);
  Context ctx(Mode::eval);
  ctx.threads = 1;
  for (auto _ : bs) {
    SeqBoatLayer<T>::Cache c;
    benchmark::DoNotOptimize(layer.forward(ctx, x, c));
  }
  bs.counters["position"] = double(L);
}

void stream_args(benchmark::internal::Benchmark* b) {
  for (int mode : {0, 1, 2})
    for (Index p : {Index(1) << 10, Index(16) << 10, Index(256) << 10}) b->Args({p, mode});
}

}  // namespace

BENCHMARK(BM_StreamStep)
    ->Apply(stream_args)
    ->Iterations(kSteps)
    ->Repetitions(15)
    ->ReportAggregatesOnly(true)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FullForwardPerToken)->Arg(1024)->Arg(4096)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
