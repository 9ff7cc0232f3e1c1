// bench/bench_layer.cpp: the whole SeqBoat layer (inference and forward+backward) over L, B, D, W, direction and
// density. bench/README.md says how to run it; docs/benchmarks.md has the tables.
//
// Benchmark names read  layer/<mode>/<direction>/L:<L>/B:<B>/D:<D>/W:<W>/density%:<p>/threads:<t>.
// Counters: tok/s (tokens per second), GFLOP/s (matrix work of bench::layer_flops; forward+backward counts 3x the
// forward), density (measured share of routed tokens), peak_B/tok (peak resident bytes of the process during the
// timed runs, per token).
#include "bench_common.hpp"

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace sma;

enum class Run { infer, train };

void layer_bench(benchmark::State& state, Run run, Direction dir) {
  const Index L = state.range(0), B = state.range(1), D = state.range(2), W = state.range(3);
  const double density = double(state.range(4)) / 100.0;
  const int threads = static_cast<int>(state.range(5));
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  using T = float;
  SeqBoatLayer<T> layer(bench::reference_config(D, W, L, dir), 0);
  const Tensor3<T> x = bench::random_input<T>(B, L, D, 1);
  const Tensor3<T> g = bench::random_input<T>(B, L, D, 2);
  bench::steer_density(layer, x, density);
  Context ctx(run == Run::train ? Mode::train : Mode::eval);
  ctx.threads = threads;
  ctx.save_for_backward = run == Run::train;
  SeqBoatLayer<T>::Cache cache;
  Tensor3<T> y, dx;
  auto once = [&] {
    layer.forward_into(ctx, x, cache, y);
    if (run == Run::train) {
      layer.backward_into(ctx, g, cache, dx);
      benchmark::DoNotOptimize(dx.data());
    }
    benchmark::DoNotOptimize(y.data());
  };
  once();  // warm-up: buffers reach their size
  bench::reset_peak_rss();
  for (auto _ : state) once();
  const double tokens = double(B) * double(L);
  const double measured = cache.density();
  const double flops = bench::layer_flops(layer.config(), B, L, measured).total() * (run == Run::train ? 3.0 : 1.0);
  state.counters["tok/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["density"] = measured;
  state.counters["peak_B/tok"] = double(bench::proc_status_bytes("VmHWM")) / tokens;
}

void names(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "B", "D", "W", "density%", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

// The reference configuration and its neighbours. Arguments: L, B, D, W, density (percent), threads.
void main_grid(benchmark::internal::Benchmark* b) {
  names(b);
  b->Args({4096, 1, 256, 256, 50, 2});
  b->Args({4096, 1, 256, 256, 50, 1});
  b->Args({4096, 4, 256, 256, 50, 2});
  b->Args({16384, 1, 128, 128, 10, 2});
}

void length_grid(benchmark::internal::Benchmark* b) {
  names(b);
  for (Index L : {1024, 4096, 16384, 65536}) b->Args({L, 1, 256, 256, 50, 2});
}

void width_grid(benchmark::internal::Benchmark* b) {
  names(b);
  for (Index D : {128, 512}) b->Args({4096, 1, D, 256, 50, 2});
  for (Index W : {64, 128, 512}) b->Args({4096, 1, 256, W, 50, 2});
}

void density_grid(benchmark::internal::Benchmark* b) {
  names(b);
  for (Index p : {0, 10, 25, 50, 75, 100}) b->Args({4096, 1, 256, 256, p, 2});
}

}  // namespace

BENCHMARK_CAPTURE(layer_bench, infer / bidir, Run::infer, Direction::bidirectional)->Apply(main_grid);
BENCHMARK_CAPTURE(layer_bench, train / bidir, Run::train, Direction::bidirectional)->Apply(main_grid);
BENCHMARK_CAPTURE(layer_bench, infer / causal, Run::infer, Direction::causal)->Apply(main_grid);
BENCHMARK_CAPTURE(layer_bench, train / causal, Run::train, Direction::causal)->Apply(main_grid);
BENCHMARK_CAPTURE(layer_bench, length_infer / bidir, Run::infer, Direction::bidirectional)->Apply(length_grid);
BENCHMARK_CAPTURE(layer_bench, length_train / bidir, Run::train, Direction::bidirectional)->Apply(length_grid);
BENCHMARK_CAPTURE(layer_bench, width_infer / bidir, Run::infer, Direction::bidirectional)->Apply(width_grid);
BENCHMARK_CAPTURE(layer_bench, density_infer / bidir, Run::infer, Direction::bidirectional)->Apply(density_grid);
BENCHMARK_CAPTURE(layer_bench, density_train / bidir, Run::train, Direction::bidirectional)->Apply(density_grid);
BENCHMARK_CAPTURE(layer_bench, density_infer / causal, Run::infer, Direction::causal)->Apply(density_grid);

SMA_BENCHMARK_MAIN()
