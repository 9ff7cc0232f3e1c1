// bench/bench_common.hpp: what the benchmarks and sma-bench-layer share: the benchmarked layer configuration (the
// one ../shared/ref-bench/ref_cpu_bench.py times in the official code), steering the router to a target density,
// peak resident memory, FLOP counts, and a malloc setting for the executables.
#pragma once

#include <sma/models/seqboat.hpp>
#include <sma/testing/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace sma::bench {

/// The configuration of the reference benchmark: zdim 64, hdim 2D, ndim 16, relu2, simple relative bias with
/// max_positions = L, layernorm pre-norm, no dropout, no truncation.
inline SeqBoatLayerConfig reference_config(Index D, Index W, Index L, Direction dir) {
  SeqBoatLayerConfig c;
  c.embed_dim = D;
  c.zdim = 64;
  c.hdim = 2 * D;
  c.ndim = 16;
  c.window_size = W;
  c.direction = dir;
  c.attention_activation = ops::AttentionActivation::relu2;
  c.rel_pos = ops::PositionEncoding::simple;
  c.max_positions = std::max<Index>(L, 1);
  c.norm_type = NormType::layernorm;
  c.prenorm = true;
  return c;
}

/// x ~ N(0, 1), (B, L, D), seeded.
template <class T>
Tensor3<T> random_input(Index B, Index L, Index D, std::uint64_t seed) {
  Tensor3<T> x(B, L, D);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(n(rng));
  return x;
}

/// Sets layer.config().router_shift so that about `density` of the B*L tokens of x are routed to attention: the
/// logit difference u1 - u0 of every token is read from one forward with no shift, and the shift is put half way
/// between the k-th and (k+1)-th largest (ref_cpu_bench.py's rule, which shifts hx_proj.bias the same way). A
/// negative density leaves the router alone (shift 0).
template <class T>
void steer_density(SeqBoatLayer<T>& layer, const Tensor3<T>& x, double density) {
  layer.config().router_shift = 0.0;
  if (density < 0) return;
  Context ctx(Mode::eval);
  typename SeqBoatLayer<T>::Cache c;
  layer.forward(ctx, x, c);
  std::vector<double> d(static_cast<std::size_t>(c.u.rows()));
  for (Index i = 0; i < c.u.rows(); ++i) d[static_cast<std::size_t>(i)] = double(c.u(i, 1)) - double(c.u(i, 0));
  std::sort(d.begin(), d.end(), std::greater<double>());
  const Index n = static_cast<Index>(d.size());
  const Index k = static_cast<Index>(std::llround(density * double(n)));
  double shift;
  if (n == 0)
    shift = 0;
  else if (k >= n)
    shift = -d.back() + 1.0;
  else if (k <= 0)
    shift = -d.front() - 1.0;
  else
    shift = -(d[static_cast<std::size_t>(k - 1)] + d[static_cast<std::size_t>(k)]) / 2;
  layer.config().router_shift = shift;
}

/// Bytes of /proc/self/status's `key` (VmRSS, VmHWM), or -1.
inline long long proc_status_bytes(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string k = std::string(key) + ":";
  while (std::getline(f, line))
    if (line.compare(0, k.size(), k) == 0) return std::stoll(line.substr(k.size())) * 1024;
  return -1;
}

/// Resets the peak resident size (VmHWM) to the current one; false where the kernel does not allow it.
inline bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  return static_cast<bool>(f.flush());
}

/// Keeps freed memory in the process (no trimming, no mmap for large blocks), so repeated runs do not pay for
/// fresh page faults on every call. For benchmark executables only: a library must not change malloc's settings.
inline void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, -1);
  mallopt(M_TOP_PAD, 64 << 20);
#endif
}

/// The main() of a Google Benchmark executable that keeps freed memory (a macro: this header is also used by
/// sma-bench-layer, which does not link Google Benchmark).
#define SMA_BENCHMARK_MAIN()                                                 \
  int main(int argc, char** argv) {                                          \
    ::sma::bench::keep_freed_memory();                                       \
    ::benchmark::Initialize(&argc, argv);                                    \
    if (::benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;      \
    ::benchmark::RunSpecifiedBenchmarks();                                   \
    ::benchmark::Shutdown();                                                 \
    return 0;                                                                \
  }

/// FLOP count of one layer forward (multiply-add = 2), the matrix work only: projections on all tokens (hx_proj)
/// and on the S activated tokens (mx_proj, h_proj), the visible attention scores and outputs, and the EMA as the
/// scan computes it (2 N multiply-adds per channel, token and direction). Elementwise work is left out.
struct FlopCount {
  double hx_proj = 0, mx_proj = 0, h_proj = 0, attention = 0, ema = 0;
  double total() const { return hx_proj + mx_proj + h_proj + attention + ema; }
};

inline FlopCount layer_flops(const SeqBoatLayerConfig& c, Index B, Index L, double density) {
  const double N = double(B) * double(L), S = N * density, D = double(c.embed_dim), Z = double(c.zdim),
               H = double(c.hdim);
  const double dirs = c.direction == Direction::bidirectional ? 2.0 : 1.0;
  FlopCount f;
  f.hx_proj = 2 * N * D * (D + 2);
  f.mx_proj = 2 * S * D * (Z + 2 * H);
  f.h_proj = 2 * S * H * D;
  // Keys visible per query: W+1 causal, 2W+1 bidirectional, at most the row's activated tokens.
  const double per_row = double(L) * density;
  const double keys = std::min(per_row, dirs * double(c.window_size) + 1);
  f.attention = 2 * S * keys * (Z + H);
  f.ema = 2 * 2 * N * D * double(c.ndim) * dirs;
  return f;
}

}  // namespace sma::bench
