// bench/bench_components.cpp: each component of the SeqBoat layer at the reference configuration (D = 256,
// Z = 64, H = 512, N = 16, W = 256, L = 4096, B = 1, half the tokens routed: S = 2048 slots), so that a profile of
// the layer can be read from the table, plus the machine's single-precision GEMM rate the projections are held to.
//
// Counters: GFLOP/s (multiply-add = 2), tok/s (tokens, or slots for the compressed components, per second).
#include "bench_common.hpp"

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace sma;
using T = float;

constexpr Index kL = 4096, kD = 256, kZ = 64, kH = 512, kN = 16, kW = 256, kS = 2048;

void set_threads(int t) {
#ifdef _OPENMP
  omp_set_num_threads(t);
#endif
}

Matrix<T> random_matrix(Index r, Index c, std::uint64_t seed) {
  const Tensor3<T> t = bench::random_input<T>(1, r, c, seed);
  return as_matrix(t);
}

void rate(benchmark::State& state, double flops, double tokens) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tok/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- the machine's GEMM rate: C (M, N) = A (M, K) B (K, N), square 1024, through Eigen (or the BLAS Eigen was
// told to call), on 1 thread or split in row blocks over the threads as the projections are. ----
void BM_sgemm(benchmark::State& state) {
  const Index n = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  const Matrix<T> a = random_matrix(n, n, 1), b = random_matrix(n, n, 2);
  Matrix<T> c(n, n);
  for (auto _ : state) {
    detail::for_row_blocks(n, threads > 1 ? 1e12 : 0.0, [&](Index r0, Index m) {
      c.middleRows(r0, m).noalias() = a.middleRows(r0, m) * b;
    });
    benchmark::DoNotOptimize(c.data());
  }
  rate(state, 2.0 * double(n) * double(n) * double(n), 0);
}
BENCHMARK(BM_sgemm)->ArgNames({"n", "threads"})->Args({1024, 1})->Args({1024, 2})->UseRealTime();

// ---- projections: rows x in -> rows x out through Linear (forward, and backward = dW, db and dx) ----
struct ProjShape {
  const char* name;
  Index rows, in, out;
};
const ProjShape kProj[] = {{"hx_proj", kL, kD, kD + 2}, {"mx_proj", kS, kD, kZ + 2 * kH}, {"h_proj", kS, kH, kD}};

void BM_projection(benchmark::State& state) {
  const ProjShape& p = kProj[state.range(0)];
  const bool backward = state.range(1) != 0;
  const int threads = static_cast<int>(state.range(2));
  set_threads(threads);
  state.SetLabel(p.name);
  Linear<T> lin(typename Linear<T>::Config{p.in, p.out, true}, 1);
  const Matrix<T> x = random_matrix(p.rows, p.in, 2), dy = random_matrix(p.rows, p.out, 3);
  Matrix<T> y(p.rows, p.out), dx(p.rows, p.in);
  for (auto _ : state) {
    if (!backward) {
      lin.forward_rows_into(x, y);
      benchmark::DoNotOptimize(y.data());
    } else {
      lin.accumulate_param_grads(x, dy);
      lin.backward_input_into(dy, dx);
      benchmark::DoNotOptimize(dx.data());
    }
  }
  rate(state, 2.0 * double(p.rows) * double(p.in) * double(p.out) * (backward ? 2 : 1), double(p.rows));
}
BENCHMARK(BM_projection)
    ->ArgNames({"proj", "backward", "threads"})
    ->ArgsProduct({{0, 1, 2}, {0, 1}, {1, 2}})
    ->UseRealTime();

// ---- EMA (without the omega term, which is elementwise): FFT, scan, and the automatic choice ----
void BM_ema(benchmark::State& state) {
  const auto algo = static_cast<EmaAlgo>(state.range(0));
  const Direction dir = state.range(1) ? Direction::bidirectional : Direction::causal;
  const bool backward = state.range(2) != 0;
  const int threads = static_cast<int>(state.range(3));
  set_threads(threads);
  state.SetLabel(to_string(algo));
  ops::EmaShape s;
  s.batch = 1;
  s.length = kL;
  s.dim = kD;
  s.order = kN;
  s.direction = dir;
  const Index R = s.rows();
  const Matrix<T> prm = random_matrix(4, R * kN, 4) * T(0.3);
  ops::EmaParamsRef<T> p{prm.row(0).data(), prm.row(1).data(), prm.row(2).data(), prm.row(3).data()};
  Matrix<T> grads = Matrix<T>::Zero(4, R * kN);
  ops::EmaGradsRef<T> g{grads.row(0).data(), grads.row(1).data(), grads.row(2).data(), grads.row(3).data()};
  const Matrix<T> x = random_matrix(kL, kD, 5), dy = random_matrix(kL, kD, 6);
  Matrix<T> y(kL, kD);
  for (auto _ : state) {
    if (!backward)
      ops::ema_forward(algo, s, p, x.data(), y.data(), threads);
    else
      ops::ema_backward(algo, s, p, x.data(), dy.data(), y.data(), g, threads);
    benchmark::DoNotOptimize(y.data());
  }
  // The scan's multiply-adds: per token, channel and direction, 2 N (forward); backward about 3 times that.
  rate(state, 2.0 * 2.0 * double(kL) * kD * kN * (s.bidirectional() ? 2 : 1) * (backward ? 3 : 1), double(kL));
}
BENCHMARK(BM_ema)
    ->ArgNames({"algo", "bidir", "backward", "threads"})
    ->ArgsProduct({{int(EmaAlgo::fft), int(EmaAlgo::scan), int(EmaAlgo::automatic)}, {0, 1}, {0, 1}, {2}})
    ->Args({int(EmaAlgo::scan), 1, 0, 1})
    ->Args({int(EmaAlgo::scan), 1, 1, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// ---- router + compression plan + gather (compress) + gated extraction ----
void BM_router_compress(benchmark::State& state) {
  const int part = static_cast<int>(state.range(0));
  set_threads(2);
  const char* labels[] = {"router", "plan", "gather", "extract_add"};
  state.SetLabel(labels[part]);
  LatentConfigurator<T> router(typename LatentConfigurator<T>::Config{kD, 2, 1.0});
  Matrix<T> u = random_matrix(kL, 2, 7);
  u.col(1).array() += T(0.0);
  Context ctx;
  typename LatentConfigurator<T>::Cache rc;
  router.forward(ctx, cmap(u), 1, kL, rc);
  Compression comp;
  plan_compression_into(rc.active, RoutingSemantics::reference, comp);
  const Matrix<T> mx = random_matrix(kL, kD, 8);
  Matrix<T> xc(comp.slots(), kD), out = Matrix<T>::Zero(kL, kD);
  for (auto _ : state) {
    switch (part) {
      case 0: router.forward(ctx, cmap(u), 1, kL, rc); break;
      case 1: plan_compression_into(rc.active, RoutingSemantics::reference, comp); break;
      case 2:
        for (Index s = 0; s < comp.slots(); ++s) xc.row(s) = mx.row(comp.token[static_cast<std::size_t>(s)]);
        break;
      default: extract_add<T>(cmap(xc), comp, rc.gate.data(), map(out)); break;
    }
    benchmark::ClobberMemory();
  }
  state.counters["slots"] = double(comp.slots());
  rate(state, 0, double(kL));
}
BENCHMARK(BM_router_compress)->ArgNames({"part"})->DenseRange(0, 3)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---- local attention over S = 2048 packed slots (one row), relu2, simple bias ----
void BM_attention(benchmark::State& state) {
  const Direction dir = state.range(0) ? Direction::bidirectional : Direction::causal;
  const bool backward = state.range(1) != 0;
  const Index block = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  set_threads(threads);
  ops::LocalAttentionConfig cfg;
  cfg.window = kW;
  cfg.direction = dir;
  cfg.activation = ops::AttentionActivation::relu2;
  cfg.position = ops::PositionEncoding::simple;
  cfg.max_positions = kL;
  cfg.query_block = block;
  cfg.threads = threads;
  const Matrix<T> q = random_matrix(kS, kZ, 9), k = random_matrix(kS, kZ, 10), v = random_matrix(kS, kH, 11);
  const Matrix<T> dout = random_matrix(kS, kH, 12);
  std::vector<Index> offsets{0, kS};
  std::vector<std::int64_t> pos(static_cast<std::size_t>(kS));
  for (Index s = 0; s < kS; ++s) pos[static_cast<std::size_t>(s)] = 2 * s;
  const Matrix<T> table = random_matrix(1, cfg.bias_table_size(), 13) * T(0.02);
  Matrix<T> dtable = Matrix<T>::Zero(1, cfg.bias_table_size());
  ops::LocalAttentionInput<T> in{cmap(q), cmap(k), cmap(v), &offsets, &pos, nullptr};
  ops::LocalAttentionSaved<T> saved;
  Matrix<T> out(kS, kH), dq, dk, dv;
  ops::local_attention_forward_into<T>(cfg, in, table.data(), &saved, map(out));
  for (auto _ : state) {
    if (!backward)
      ops::local_attention_forward_into<T>(cfg, in, table.data(), &saved, map(out));
    else
      ops::local_attention_backward<T>(cfg, in, table.data(), saved, cmap(dout), dq, dk, dv, dtable.data());
    benchmark::ClobberMemory();
  }
  const double keys = dir == Direction::causal ? kW + 1 : 2 * kW + 1;
  rate(state, 2.0 * kS * keys * (kZ + kH) * (backward ? 2.5 : 1), double(kS));
}
BENCHMARK(BM_attention)
    ->ArgNames({"bidir", "backward", "block", "threads"})
    ->ArgsProduct({{0, 1}, {0, 1}, {0}, {2}})
    ->ArgsProduct({{0, 1}, {0}, {16, 32, 64}, {2}})
    ->Args({1, 0, 0, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- the GAU on S = 2048 slots: projection, q/k/r/v, attention, gate, h_proj (forward; and backward) ----
void BM_gau(benchmark::State& state) {
  const Direction dir = state.range(0) ? Direction::bidirectional : Direction::causal;
  const int mode = static_cast<int>(state.range(1));  // 0 inference, 1 forward saving, 2 backward
  const int threads = static_cast<int>(state.range(2));
  set_threads(threads);
  const char* labels[] = {"infer", "forward (saving)", "backward"};
  state.SetLabel(labels[mode]);
  Gau<T>::Config gc;
  gc.dim = kD;
  gc.zdim = kZ;
  gc.hdim = kH;
  gc.attention.window = kW;
  gc.attention.direction = dir;
  gc.attention.max_positions = kL;
  Gau<T> gau(gc);
  Tensor2<std::uint8_t> active(1, kL);
  for (Index t = 0; t < kL; ++t) active(0, t) = t % 2;
  const Compression comp = plan_compression(active, RoutingSemantics::reference);
  const Matrix<T> xc = random_matrix(kS, kD, 14), dh = random_matrix(kS, kD, 15);
  Context ctx;
  ctx.threads = threads;
  ctx.save_for_backward = mode != 0;
  Gau<T>::Cache cache;
  Matrix<T> h, dxc;
  gau.forward_into(ctx, cmap(xc), comp, cache, h);
  for (auto _ : state) {
    if (mode < 2)
      gau.forward_into(ctx, cmap(xc), comp, cache, h);
    else
      gau.backward_into(ctx, cmap(dh), comp, cache, dxc);
    benchmark::ClobberMemory();
  }
  const double keys = dir == Direction::causal ? kW + 1 : 2 * kW + 1;
  const double fwd = 2.0 * kS * (kD * (kZ + 2 * kH) + kH * kD + keys * (kZ + kH));
  rate(state, fwd * (mode == 2 ? 2 : 1), double(kS));
}
BENCHMARK(BM_gau)
    ->ArgNames({"bidir", "mode", "threads"})
    ->ArgsProduct({{0, 1}, {0, 1, 2}, {2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- the attention branch alone over the density: the GAU on the d L activated tokens of one L = 4096 row
// (inference, bidirectional), for the density curve of docs/benchmarks.md ----
void BM_gau_density(benchmark::State& state) {
  const double density = double(state.range(0)) / 100.0;
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  Gau<T>::Config gc;
  gc.dim = kD;
  gc.zdim = kZ;
  gc.hdim = kH;
  gc.attention.window = kW;
  gc.attention.direction = Direction::bidirectional;
  gc.attention.max_positions = kL;
  Gau<T> gau(gc);
  // Activate round(d L) tokens spread evenly over the row.
  const Index S = static_cast<Index>(std::llround(density * kL));
  Tensor2<std::uint8_t> active(1, kL);
  active.setZero();
  for (Index i = 0; i < S; ++i) active(0, std::min<Index>(kL - 1, (i * kL) / std::max<Index>(S, 1))) = 1;
  Compression comp;
  plan_compression_into(active, RoutingSemantics::per_row, comp);
  const Matrix<T> x = random_matrix(kL, kD, 19);
  std::vector<T> gate(static_cast<std::size_t>(kL), T(0.5));
  Matrix<T> out = Matrix<T>::Zero(kL, kD), h;
  Context ctx;
  ctx.threads = threads;
  ctx.save_for_backward = false;
  Gau<T>::Cache cache;
  for (auto _ : state) {
    if (comp.slots() > 0) gau.forward_extract_add(ctx, cmap(x), comp, gate.data(), cache, map(out), h);
    benchmark::ClobberMemory();
  }
  state.counters["slots"] = double(comp.slots());
  rate(state, 0, double(kL));
}
BENCHMARK(BM_gau_density)
    ->ArgNames({"density%", "threads"})
    ->ArgsProduct({{0, 10, 25, 50, 75, 100}, {2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- norms (LayerNorm, the reference's pre-norm) and the SiLU on (L, D) ----
void BM_norm(benchmark::State& state) {
  const bool backward = state.range(0) != 0;
  set_threads(2);
  LayerNorm<T> norm(typename LayerNorm<T>::Config{kD});
  const Tensor3<T> x = bench::random_input<T>(1, kL, kD, 16), dy = bench::random_input<T>(1, kL, kD, 17);
  Context ctx;
  typename LayerNorm<T>::Cache cache;
  Tensor3<T> y, dx;
  norm.forward_into(ctx, x, cache, y);
  for (auto _ : state) {
    if (!backward)
      norm.forward_into(ctx, x, cache, y);
    else
      norm.backward_into(ctx, dy, cache, dx);
    benchmark::ClobberMemory();
  }
  rate(state, 0, double(kL));
}
BENCHMARK(BM_norm)->ArgNames({"backward"})->DenseRange(0, 1)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_silu(benchmark::State& state) {
  set_threads(2);
  Matrix<T> x = random_matrix(kL, kD, 18);
  const Matrix<T> x0 = x;
  for (auto _ : state) {
    x = x0;
    silu_inplace(x);
    benchmark::ClobberMemory();
  }
  rate(state, 0, double(kL));
}
BENCHMARK(BM_silu)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

SMA_BENCHMARK_MAIN()
