// sma-bench-layer: times one SeqBoat layer configuration and prints one JSON object.
//
//   sma-bench-layer --D 256 --L 4096 --B 1 --direction bidir --density 0.5 --mode infer --threads 2
//
// The layer is built like the reference benchmark's (bench/README.md): zdim 64, hdim 2D, ndim 16, relu2, simple
// relative bias with max_positions = L, layernorm pre-norm, no dropout; every width and choice has a flag. The
// density is forced by shifting the router logits (the same rule as ../shared/ref-bench/ref_cpu_bench.py).
// Output: the configuration, the measured density, median and minimum seconds over the repetitions, the peak
// resident memory during the timed runs (and before them), tokens per second and the matrix GFLOP/s.
#include "bench_common.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Options {
  sma::Index D = 256, Z = 64, H = -1, N = 16, W = 256, L = 4096, B = 1, max_positions = -1, truncation = 0;
  std::string direction = "bidir", activation = "relu2", position = "simple", dtype = "float", mode = "infer";
  std::string norm = "layernorm", ema = "automatic";
  bool postnorm = false, keep_memory = true;
  int threads = 2, warmup = 1, reps = 5;
  double density = 0.5;
  std::uint64_t seed = 0;
};

sma::EmaAlgo parse_ema(const std::string& s) {
  if (s == "automatic") return sma::EmaAlgo::automatic;
  if (s == "fft") return sma::EmaAlgo::fft;
  if (s == "scan") return sma::EmaAlgo::scan;
  if (s == "direct") return sma::EmaAlgo::direct;
  throw sma::ValueError("unknown --ema '" + s + "' (automatic, fft, scan, direct)");
}

template <class T>
nlohmann::json run(const Options& o) {
  using namespace sma;
  const Direction dir = o.direction == "causal" ? Direction::causal : Direction::bidirectional;
  SeqBoatLayerConfig cfg = bench::reference_config(o.D, o.W, o.L, dir);
  cfg.zdim = o.Z;
  cfg.hdim = o.H > 0 ? o.H : 2 * o.D;
  cfg.ndim = o.N;
  cfg.attention_activation = ops::parse_attention_activation(o.activation);
  cfg.rel_pos = ops::parse_position_encoding(o.position);
  if (o.max_positions > 0) cfg.max_positions = o.max_positions;
  cfg.truncation = o.truncation;
  cfg.norm_type = parse_norm_type(o.norm);
  cfg.prenorm = !o.postnorm;
  cfg.ema_algo = parse_ema(o.ema);

  SeqBoatLayer<T> layer(cfg, o.seed);
  const Tensor3<T> x = bench::random_input<T>(o.B, o.L, o.D, o.seed + 1);
  const Tensor3<T> g = bench::random_input<T>(o.B, o.L, o.D, o.seed + 2);
  bench::steer_density(layer, x, o.density);

  const bool train = o.mode == "train";
  Context ctx(train ? Mode::train : Mode::eval);
  ctx.threads = o.threads;
  ctx.save_for_backward = train;  // inference keeps nothing for backward (like torch.no_grad())
  // The cache and the output tensors live across repetitions: the library reuses their storage.
  typename SeqBoatLayer<T>::Cache cache;
  Tensor3<T> y, dx;
  double density = 0;
  auto once = [&] {
    if (train) for_each_param(layer, [](const std::string&, Param<T>& p) { p.grad_vec().setZero(); });
    layer.forward_into(ctx, x, cache, y);
    if (train) {
      layer.backward_into(ctx, g, cache, dx);
      if (!std::isfinite(double(dx.data()[0]))) throw NumericError("sma-bench-layer: non-finite dx");
    }
    if (!std::isfinite(double(y.data()[0]))) throw NumericError("sma-bench-layer: non-finite output");
    density = cache.density();
  };
  for (int i = 0; i < o.warmup; ++i) once();
  const long long rss_before = bench::proc_status_bytes("VmRSS");
  const bool peak_ok = bench::reset_peak_rss();
  std::vector<double> times, cpu;
  for (int i = 0; i < std::max(1, o.reps); ++i) {
    const double c0 = process_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    once();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    cpu.push_back(process_cpu_seconds() - c0);
  }
  const long long peak = peak_ok ? bench::proc_status_bytes("VmHWM") : -1;
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const std::size_t n = sorted.size();
  const double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  const double tokens = double(o.B) * double(o.L);
  const double flops = bench::layer_flops(cfg, o.B, o.L, density).total() * (train ? 3.0 : 1.0);

  nlohmann::json j;
  j["D"] = o.D;
  j["Z"] = cfg.zdim;
  j["H"] = cfg.hdim;
  j["N"] = cfg.ndim;
  j["W"] = o.W;
  j["L"] = o.L;
  j["B"] = o.B;
  j["direction"] = o.direction;
  j["activation"] = o.activation;
  j["position"] = o.position;
  j["dtype"] = o.dtype;
  j["threads"] = o.threads;
  j["mode"] = o.mode;
  j["ema"] = o.ema;
  j["target_density"] = o.density;
  j["density"] = density;
  j["router_shift"] = layer.config().router_shift;
  j["median_s"] = median;
  j["min_s"] = sorted.front();
  j["runs_s"] = times;
  // CPU time of the whole process per run (all threads; includes OpenMP's spinning at barriers). On a machine
  // shared with other work, wall time is what others leave us, CPU time what the run itself needed.
  std::sort(cpu.begin(), cpu.end());
  j["cpu_s_median"] = cpu.size() % 2 ? cpu[cpu.size() / 2] : 0.5 * (cpu[cpu.size() / 2 - 1] + cpu[cpu.size() / 2]);
  j["peak_rss_bytes"] = peak;
  j["rss_before_bytes"] = rss_before;
  j["peak_bytes_per_token"] = peak > 0 ? double(peak) / tokens : -1.0;
  j["tokens_per_s"] = tokens / median;
  j["gflop"] = flops * 1e-9;
  j["gflop_per_s"] = flops * 1e-9 / median;
  j["keep_freed_memory"] = o.keep_memory;
#ifdef SMA_WITH_BLAS
  j["blas"] = true;
#else
  j["blas"] = false;
#endif
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time one SeqBoat layer configuration; prints one JSON object"};
  Options o;
  app.add_option("--D", o.D, "embed_dim")->capture_default_str();
  app.add_option("--Z", o.Z, "zdim (query/key width)")->capture_default_str();
  app.add_option("--H", o.H, "hdim (value width); default 2 D");
  app.add_option("--N", o.N, "EMA order ndim")->capture_default_str();
  app.add_option("--W", o.W, "window size (compressed slots)")->capture_default_str();
  app.add_option("--L", o.L, "sequence length")->capture_default_str();
  app.add_option("--B", o.B, "batch size")->capture_default_str();
  app.add_option("--direction", o.direction, "bidir or causal")
      ->check(CLI::IsMember({"bidir", "causal"}))
      ->capture_default_str();
  app.add_option("--activation", o.activation, "attention activation: relu2, softmax, laplace")
      ->check(CLI::IsMember({"relu2", "softmax", "laplace"}))
      ->capture_default_str();
  app.add_option("--position", o.position, "position encoding: none, simple, local_simple, rotary")
      ->check(CLI::IsMember({"none", "simple", "local_simple", "rotary"}))
      ->capture_default_str();
  app.add_option("--max-positions", o.max_positions, "simple bias table size P (default L)");
  app.add_option("--truncation", o.truncation, "EMA kernel truncation (0 = none)")->capture_default_str();
  app.add_option("--norm", o.norm, "layernorm, batchnorm, scalenorm, rmsnorm")->capture_default_str();
  app.add_flag("--postnorm", o.postnorm, "post-norm instead of pre-norm");
  app.add_option("--ema", o.ema, "EMA algorithm: automatic, fft, scan, direct")->capture_default_str();
  app.add_option("--dtype", o.dtype, "scalar type: float or double")
      ->check(CLI::IsMember({"float", "double"}))
      ->capture_default_str();
  app.add_option("--threads", o.threads, "OpenMP threads")->capture_default_str();
  app.add_option("--mode", o.mode, "infer (forward, eval) or train (forward + backward)")
      ->check(CLI::IsMember({"infer", "train"}))
      ->capture_default_str();
  app.add_option("--density", o.density, "target share of tokens routed to attention (< 0: router untouched)")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "untimed runs")->capture_default_str();
  app.add_option("--reps", o.reps, "timed runs")->capture_default_str();
  app.add_option("--seed", o.seed, "parameter and input seed")->capture_default_str();
  bool fresh_memory = false;
  app.add_flag("--fresh-memory", fresh_memory,
               "leave malloc's defaults (large blocks are returned to the OS and page-fault again on every call)");
  CLI11_PARSE(app, argc, argv);
  o.keep_memory = !fresh_memory;
  if (o.keep_memory) sma::bench::keep_freed_memory();
#ifdef _OPENMP
  omp_set_num_threads(o.threads);
#endif
  try {
    const nlohmann::json j = o.dtype == "double" ? run<double>(o) : run<float>(o);
    std::cout << j.dump() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "sma-bench-layer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
