// sma_bench_cuda_bounded: times cuda::bounded_gemm (products bounded by the device's S) against the same products
// on the whole upper bound (BoundedGemmMode::full, plain cuBLAS calls), at densities 0.1 / 0.5 / 1, with CUDA events
// (median of the repetitions):
//   - a projection y = x W^T over M_max = 65,536 rows (K 512, N 1024), bf16 and fp32, with 8, 16 and 32 chunks;
//   - a weight gradient dW = dy^T x (1024 x 512) reduced over the 65,536 rows, bf16;
//   - the bf16 local attention (relu2 rotary causal, Z 128, H 1024, W 256, 16 rows of 4096 tokens compressed to
//     65,536 slots at most), forward and forward+backward, whose band products use bounded_gemm.
// Output: a line per measurement on stdout; JSON lines in the file given as the first argument (optional); the
// second argument is the number of repetitions (10).
// Not a test: run it by hand on a GPU machine (docs/cuda.md).
#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/bounded_gemm.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/compress.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/local_attention.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

std::vector<float> random_vector(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

std::vector<std::uint16_t> random_bf16(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<std::uint16_t> v(n);
  for (auto& b : v) {
    const float x = u(rng);
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    b = static_cast<std::uint16_t>(bits >> 16);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const std::string device = cuda::device_description(0);
  std::FILE* json = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  const int reps = cuda::positive_arg(argc, argv, 2, 10);
  std::printf("median of %d\n", reps);
  cuda::Stream stream;
  void* s = stream.handle();

  const auto report = [&](const char* what, const char* variant, double density, int S, double ms) {
    std::printf("%-34s | %-22s | density %.1f S %6d | %8.3f ms\n", what, variant, density, S, ms);
    if (json)
      std::fprintf(json,
                   "{\"device\": \"%s\", \"what\": \"%s\", \"variant\": \"%s\", \"density\": %.2f, \"S\": %d, "
                   "\"ms\": %.5f}\n",
                   device.c_str(), what, variant, density, S, ms);
  };
  const auto timed = [&](cuda::BoundedGemmMode mode, const std::function<void()>& fn) {
    cuda::set_bounded_gemm_mode(mode);
    const float ms = cuda::time_median_ms(fn, s, reps);
    cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::graph);
    return ms;
  };

  // 1. The primitive alone.
  const int M = 65536, K = 512, N = 1024;
  cuda::DeviceArray<std::uint16_t> x16(random_bf16(static_cast<std::size_t>(M) * K, 1)),
      w16(random_bf16(static_cast<std::size_t>(N) * K, 2)), dy16(random_bf16(static_cast<std::size_t>(M) * N, 3));
  cuda::DeviceArray<float> x32(random_vector(static_cast<std::size_t>(M) * K, 1.f, 4)),
      w32(random_vector(static_cast<std::size_t>(N) * K, 1.f, 5));
  cuda::DeviceArray<float> y(static_cast<std::size_t>(M) * N), dw(static_cast<std::size_t>(N) * K);
  cuda::DeviceArray<int> count(std::vector<int>{M});
  for (double density : {0.1, 0.5, 1.0}) {
    const int S = static_cast<int>(density * M);
    count.upload(std::vector<int>{S});
    for (cuda::GemmType t : {cuda::GemmType::bf16, cuda::GemmType::fp32}) {
      const bool bf = t == cuda::GemmType::bf16;
      cuda::BoundedGemm g;
      g.type = t;
      g.trans_b = true;
      g.m = M;
      g.n = N;
      g.k = K;
      g.a = bf ? static_cast<const void*>(x16.data()) : x32.data();
      g.lda = K;
      g.b = bf ? static_cast<const void*>(w16.data()) : w32.data();
      g.ldb = K;
      g.c = y.data();
      g.ldc = N;
      const char* what = bf ? "projection bf16 65536x512 -> 1024" : "projection fp32 65536x512 -> 1024";
      report(what, "full (cuBLAS, M_max)", density, S,
             timed(cuda::BoundedGemmMode::full, [&] { cuda::bounded_gemm(g, count.data(), s); }));
      for (int chunks : {8, 16, 32}) {
        g.chunk = M / chunks;
        const std::string v = "graph, " + std::to_string(chunks) + " chunks";
        report(what, v.c_str(), density, S,
               timed(cuda::BoundedGemmMode::graph, [&] { cuda::bounded_gemm(g, count.data(), s); }));
      }
    }
    // dW (N x K) = dy^T x over the S rows (rows past S: whatever the buffers hold; only the timing matters here).
    cuda::BoundedGemm r;
    r.type = cuda::GemmType::bf16;
    r.trans_a = true;
    r.m = N;
    r.n = K;
    r.k = M;
    r.a = dy16.data();
    r.lda = N;
    r.b = x16.data();
    r.ldb = K;
    r.c = dw.data();
    r.ldc = K;
    r.bound = cuda::GemmBound::reduction;
    const char* what = "weight grad bf16 1024x512, K 65536";
    report(what, "full (cuBLAS, M_max)", density, S,
           timed(cuda::BoundedGemmMode::full, [&] { cuda::bounded_gemm(r, count.data(), s); }));
    report(what, "graph, 16 chunks", density, S,
           timed(cuda::BoundedGemmMode::graph, [&] { cuda::bounded_gemm(r, count.data(), s); }));
  }

  // 2. The bf16 attention at the shape.
  const int B = 16, L = 4096, Z = 128, H = 1024, W = 256, T = B * L;
  cuda::DeviceArray<float> xq(random_vector(static_cast<std::size_t>(T) * Z, 1.f, 12)),
      xk(random_vector(static_cast<std::size_t>(T) * Z, 1.f, 13)),
      xv(random_vector(static_cast<std::size_t>(T) * H, 1.f, 14));
  cuda::DeviceArray<float> q(static_cast<std::size_t>(T) * Z), k(static_cast<std::size_t>(T) * Z),
      v(static_cast<std::size_t>(T) * H), out(static_cast<std::size_t>(T) * H),
      dout(random_vector(static_cast<std::size_t>(T) * H, 1.f, 15)), dq(static_cast<std::size_t>(T) * Z),
      dk(static_cast<std::size_t>(T) * Z), dv(static_cast<std::size_t>(T) * H), stat(static_cast<std::size_t>(T));
  cuda::DeviceCompression plan(B, L);
  for (double density : {0.1, 0.5, 1.0}) {
    std::mt19937 rng(11);
    std::bernoulli_distribution on(density);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(T));
    for (auto& m : mask) m = on(rng) ? 1 : 0;
    cuda::DeviceArray<std::uint8_t> active(mask);
    cuda::plan_compression(active.data(), cuda::CompressionSemantics::per_row, plan.view(), s);
    stream.synchronize();
    const int S = plan.offsets().back();
    const auto pv = plan.view();
    cuda::compress(xq.data(), Z, pv, q.data(), s);
    cuda::compress(xk.data(), Z, pv, k.data(), s);
    cuda::compress(xv.data(), H, pv, v.data(), s);
    cuda::LocalAttentionConfig cfg;
    cfg.window = W;
    cfg.causal = true;
    cfg.activation = cuda::Activation::relu2;
    cfg.position = cuda::Position::rotary;
    cfg.bf16 = true;
    cuda::LocalAttentionInputs in;
    in.batch = B;
    in.capacity = T;
    in.z = Z;
    in.h = H;
    in.offsets = pv.offsets;
    in.positions = pv.positions;
    in.q = q.data();
    in.k = k.data();
    in.v = v.data();
    const auto fwd = [&] { cuda::local_attention_forward(cfg, in, nullptr, out.data(), stat.data(), s); };
    const auto fwd_bwd = [&] {
      fwd();
      cuda::local_attention_backward(cfg, in, nullptr, nullptr, nullptr, dout.data(), dq.data(), dk.data(), dv.data(),
                                     nullptr, s);
    };
    for (cuda::BoundedGemmMode mode : {cuda::BoundedGemmMode::full, cuda::BoundedGemmMode::graph}) {
      const char* v = mode == cuda::BoundedGemmMode::full ? "full (cuBLAS, capacity)" : "graph (bounded by S)";
      const cuda::BoundedGemmStats b0 = cuda::bounded_gemm_stats();
      report("bf16 attention forward", v, density, S, timed(mode, fwd));
      report("bf16 attention forward+backward", v, density, S, timed(mode, fwd_bwd));
      const cuda::BoundedGemmStats b1 = cuda::bounded_gemm_stats();
      std::printf("  graphs built %lld, launched %lld, cached %lld, chunks captured as child graphs %lld\n",
                  b1.builds - b0.builds, b1.launches - b0.launches, b1.cached, b1.child_graphs);
    }
  }
  if (json) std::fclose(json);
  return 0;
}
