// sma_bench_cuda: times the device ops at the shape (65,536 tokens = B 16 x L 4096, Z 128, H 1024, W 256,
// D 512) for activation densities 0.1 / 0.5 / 1.0, with CUDA events (median of the repetitions). Everything is
// launched for the B*L upper bound straight after plan_compression, as a model would (S never reaches the host).
// Output: one line per measurement on stdout, and JSON lines in the file given as the first argument (optional).
// Every attention configuration runs in fp32 and on the bf16 path (LocalAttentionConfig::bf16). Then (unless the
// third argument is "attention") the EMA (chunked scan) and the whole SeqBoat layer (SeqBoatLayerDevice, causal,
// relu2, layernorm pre-norm, rotary; and the simple bias with P = L at L = 64K) at 64K tokens for L = 1K..64K, the
// density steered with the router shift (measured and printed).
// Not a test: run it by hand on a GPU machine (docs/cuda.md), next to tests/cuda/bench_flex.py for the baseline.
#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/compress.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/ema.hpp>
#include <sma/cuda/local_attention.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/models/seqboat.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

struct Shape {
  int B = 16, L = 4096, D = 512, Z = 128, H = 1024, W = 256;
};

std::vector<float> random_vector(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const std::string device = cuda::device_description(0);
  std::FILE* json = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  const int reps = cuda::positive_arg(argc, argv, 2, 10);
  // "profile": only the layer at B=16 L=4096, one warm-up and one timed forward+backward per variant (fp32 at
  // density 1; bf16 projections + attention at density 1 and 0.1), for a kernel-by-kernel profile under ncu.
  const bool profile = argc > 3 && std::string(argv[3]) == "profile";
  // "attention": only the attention rows (the densities loop), no EMA and no layer.
  // "attention-profile": two bf16 forward+backward passes (relu2 rotary causal, density 1), nothing else, for ncu.
  const bool attention_profile = argc > 3 && std::string(argv[3]) == "attention-profile";
  const bool attention_only = attention_profile || (argc > 3 && std::string(argv[3]) == "attention");
  const Shape sh;
  const int N = sh.B * sh.L;
  std::printf("shape: B=%d L=%d (tokens %d) D=%d Z=%d H=%d W=%d, fp32 unless marked bf16, median of %d\n", sh.B, sh.L,
              N, sh.D, sh.Z, sh.H, sh.W, reps);

  cuda::Stream stream;
  void* s = stream.handle();
  // Inputs over all B*L tokens; the compressed tensors are allocated for the B*L bound.
  cuda::DeviceArray<float> x(random_vector(static_cast<std::size_t>(N) * sh.D, 1.f, 1));
  cuda::DeviceArray<float> xq(random_vector(static_cast<std::size_t>(N) * sh.Z, 1.f, 2));
  cuda::DeviceArray<float> xk(random_vector(static_cast<std::size_t>(N) * sh.Z, 1.f, 3));
  cuda::DeviceArray<float> xv(random_vector(static_cast<std::size_t>(N) * sh.H, 1.f, 4));
  cuda::DeviceArray<float> gate(random_vector(static_cast<std::size_t>(N), 1.f, 5));
  cuda::DeviceArray<float> xc(static_cast<std::size_t>(N) * sh.D), y(static_cast<std::size_t>(N) * sh.D);
  cuda::DeviceArray<float> q(static_cast<std::size_t>(N) * sh.Z), k(static_cast<std::size_t>(N) * sh.Z),
      v(static_cast<std::size_t>(N) * sh.H), out(static_cast<std::size_t>(N) * sh.H),
      dout(random_vector(static_cast<std::size_t>(N) * sh.H, 1.f, 6)), dq(static_cast<std::size_t>(N) * sh.Z),
      dk(static_cast<std::size_t>(N) * sh.Z), dv(static_cast<std::size_t>(N) * sh.H), stat(static_cast<std::size_t>(N));
  cuda::DeviceArray<float> table(random_vector(2 * 1024 - 1, 0.1f, 7)), dtable(2 * 1024 - 1);
  cuda::DeviceCompression plan(sh.B, sh.L);

  for (double density : {0.1, 0.5, 1.0}) {
    if (profile) break;
    if (attention_profile && density != 1.0) continue;
    std::mt19937 rng(11);
    std::bernoulli_distribution on(density);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(N));
    for (auto& m : mask) m = on(rng) ? 1 : 0;
    cuda::DeviceArray<std::uint8_t> active(mask);
    cuda::plan_compression(active.data(), cuda::CompressionSemantics::per_row, plan.view(), s);
    stream.synchronize();
    const int S = plan.offsets().back();
    const auto pv = plan.view();
    cuda::compress(xq.data(), sh.Z, pv, q.data(), s);
    cuda::compress(xk.data(), sh.Z, pv, k.data(), s);
    cuda::compress(xv.data(), sh.H, pv, v.data(), s);

    const auto report = [&](const char* what, const char* cfg, double ms, double gflop) {
      std::printf("density %.1f S %6d | %-28s | %-34s | %9.3f ms", density, S, what, cfg, ms);
      if (gflop > 0) std::printf(" | %6.2f TFLOP/s (visible pairs)", gflop / ms);
      std::printf("\n");
      if (json)
        std::fprintf(json,
                     "{\"device\": \"%s\", \"density\": %.2f, \"S\": %d, \"what\": \"%s\", \"config\": \"%s\", "
                     "\"ms\": %.5f, \"gflop_visible\": %.3f}\n",
                     device.c_str(), density, S, what, cfg, ms, gflop);
    };

    report("plan_compression", "B=16 L=4096", cuda::time_median_ms([&] {
             cuda::plan_compression(active.data(), cuda::CompressionSemantics::per_row, plan.view(), s);
           }, s, reps), 0);
    report("compress x", "D=512", cuda::time_median_ms([&] { cuda::compress(x.data(), sh.D, pv, xc.data(), s); }, s, reps), 0);
    report("extract_add", "D=512", cuda::time_median_ms([&] { cuda::extract_add(xc.data(), sh.D, pv, gate.data(), y.data(), s); },
                                             s, reps), 0);

    struct Cfg {
      const char* name;
      cuda::Activation act;
      cuda::Position pos;
      bool causal;
      bool bf16 = false;  // LocalAttentionConfig::bf16: the tensor-core band path
    };
    const Cfg cfgs[] = {{"relu2 rotary causal", cuda::Activation::relu2, cuda::Position::rotary, true},
                        {"relu2 rotary bidirectional", cuda::Activation::relu2, cuda::Position::rotary, false},
                        {"relu2 simple(P=1024) causal", cuda::Activation::relu2, cuda::Position::simple, true},
                        {"softmax rotary causal", cuda::Activation::softmax, cuda::Position::rotary, true},
                        {"bf16 relu2 rotary causal", cuda::Activation::relu2, cuda::Position::rotary, true, true},
                        {"bf16 relu2 rotary bidirectional", cuda::Activation::relu2, cuda::Position::rotary, false,
                         true},
                        {"bf16 relu2 simple(P=1024) causal", cuda::Activation::relu2, cuda::Position::simple, true,
                         true},
                        {"bf16 softmax rotary causal", cuda::Activation::softmax, cuda::Position::rotary, true, true}};
    for (const Cfg& c : cfgs) {
      cuda::LocalAttentionConfig cfg;
      cfg.window = sh.W;
      cfg.causal = c.causal;
      cfg.activation = c.act;
      cfg.position = c.pos;
      cfg.max_positions = 1024;
      cfg.bf16 = c.bf16;
      cuda::LocalAttentionInputs in;
      in.batch = sh.B;
      in.capacity = N;
      in.z = sh.Z;
      in.h = sh.H;
      in.offsets = pv.offsets;
      in.positions = pv.positions;
      in.q = q.data();
      in.k = k.data();
      in.v = v.data();
      // Visible pairs per query ~ min(W, row length) + 1 causal (2W + 1 bidirectional), counted on the host plan.
      const std::vector<int> off = plan.offsets();
      double pairs = 0;
      for (int b = 0; b < sh.B; ++b) {
        const long long len = off[b + 1] - off[b];
        for (long long i = 0; i < len; ++i) {
          const long long lo = std::max(0LL, i - sh.W), hi = c.causal ? i + 1 : std::min(len, i + sh.W + 1);
          pairs += static_cast<double>(hi - lo);
        }
      }
      const double fwd_gflop = 2.0 * pairs * (sh.Z + sh.H) * 1e-9;
      // Backward as counted for FlashAttention: the recomputed scores, dA, dV, dQ, dK (5 products).
      const double bwd_gflop = 2.0 * pairs * (3.0 * sh.Z + 2.0 * sh.H) * 1e-9;
      if (attention_profile) {
        if (!(c.bf16 && c.act == cuda::Activation::relu2 && c.causal && c.pos == cuda::Position::rotary)) continue;
        for (int r = 0; r < 2; ++r) {
          cuda::local_attention_forward(cfg, in, table.data(), out.data(), stat.data(), s);
          cuda::local_attention_backward(cfg, in, table.data(), out.data(), stat.data(), dout.data(), dq.data(),
                                         dk.data(), dv.data(), dtable.data(), s);
        }
        stream.synchronize();
        continue;
      }
      const float ms_f = cuda::time_median_ms([&] {
        cuda::local_attention_forward(cfg, in, table.data(), out.data(), stat.data(), s);
      }, s, reps);
      report("attention forward", c.name, ms_f, fwd_gflop);
      const float ms_fb = cuda::time_median_ms([&] {
        cuda::local_attention_forward(cfg, in, table.data(), out.data(), stat.data(), s);
        cuda::local_attention_backward(cfg, in, table.data(), out.data(), stat.data(), dout.data(), dq.data(),
                                       dk.data(), dv.data(), dtable.data(), s);
      }, s, reps);
      report("attention forward+backward", c.name, ms_fb, fwd_gflop + bwd_gflop);
    }
  }

  // ---- EMA ----
  for (bool bidir : {false, true}) {
    if (profile || attention_only) break;
    cuda::EmaConfig ec;
    ec.batch = sh.B;
    ec.length = sh.L;
    ec.dim = sh.D;
    ec.order = 16;
    ec.bidirectional = bidir;
    const int R = ec.rows();
    cuda::DeviceArray<float> delta(random_vector(static_cast<std::size_t>(R) * 16, 0.5f, 21)),
        alpha(random_vector(static_cast<std::size_t>(R) * 16, 0.5f, 22)),
        beta(random_vector(static_cast<std::size_t>(R) * 16, 1.f, 23)),
        gamma(random_vector(static_cast<std::size_t>(R) * 16, 1.f, 24)), omega(random_vector(sh.D, 1.f, 25));
    cuda::DeviceArray<float> gd(static_cast<std::size_t>(R) * 16), ga(static_cast<std::size_t>(R) * 16),
        gb(static_cast<std::size_t>(R) * 16), gg(static_cast<std::size_t>(R) * 16), go(sh.D);
    for (auto* g : {&gd, &ga, &gb, &gg, &go}) g->fill_bytes(0, s);
    const cuda::EmaParams p{delta.data(), alpha.data(), beta.data(), gamma.data(), omega.data()};
    const cuda::EmaGrads g{gd.data(), ga.data(), gb.data(), gg.data(), go.data()};
    const char* name = bidir ? "B=16 L=4096 D=512 N=16 bidir" : "B=16 L=4096 D=512 N=16 causal";
    const float ms_f = cuda::time_median_ms([&] { cuda::ema_forward(ec, p, x.data(), nullptr, y.data(), s); }, s, reps);
    const float ms_fb = cuda::time_median_ms([&] {
      cuda::ema_forward(ec, p, x.data(), nullptr, y.data(), s);
      cuda::ema_backward(ec, p, x.data(), nullptr, x.data(), xc.data(), g, s);
    }, s, reps);
    std::printf("ema | %-34s | segment %4d | forward %8.3f ms | forward+backward %8.3f ms\n", name,
                cuda::ema_segment_length(ec), ms_f, ms_fb);
    if (json)
      std::fprintf(json, "{\"device\": \"%s\", \"what\": \"ema\", \"config\": \"%s\", \"fwd_ms\": %.5f, "
                         "\"fwd_bwd_ms\": %.5f}\n", device.c_str(), name, ms_f, ms_fb);
  }

  // ---- the whole layer ----
  cuda::DeviceArray<float> lx(random_vector(static_cast<std::size_t>(N) * sh.D, 1.f, 31)),
      ldy(random_vector(static_cast<std::size_t>(N) * sh.D, 1.f, 32)), lout(static_cast<std::size_t>(N) * sh.D),
      ldx(static_cast<std::size_t>(N) * sh.D);
  struct LayerRun {
    int L;
    ops::PositionEncoding pos;
  };
  const LayerRun runs[] = {{1024, ops::PositionEncoding::rotary}, {4096, ops::PositionEncoding::rotary},
                           {16384, ops::PositionEncoding::rotary}, {65536, ops::PositionEncoding::rotary},
                           {65536, ops::PositionEncoding::simple}};
  if (attention_only) {
    if (json) std::fclose(json);
    return 0;
  }
  if (profile) {
    SeqBoatLayerConfig lc;
    lc.rel_pos = ops::PositionEncoding::rotary;
    lc.embed_dim = sh.D;
    lc.zdim = sh.Z;
    lc.hdim = sh.H;
    lc.ndim = 16;
    lc.window_size = sh.W;
    lc.router_shift = 1000;
    SeqBoatLayer<float> cpu(lc, 7);
    cuda::SeqBoatLayerDevice dev = cuda::SeqBoatLayerDevice::from_cpu(cpu);
    // fp32 at density 1, then bf16 projections + bf16 attention at density 1 and at density 0.1.
    const struct { bool bf16; double density; } variants[] = {{false, 1.0}, {true, 1.0}, {true, 0.1}};
    for (const auto& var : variants) {
      dev.set_bf16_projections(var.bf16);
      dev.set_bf16_attention(var.bf16);
      const double got = cuda::steer_density(dev, sh.B, sh.L, lx.data(), lout.data(), var.density, s);
      std::printf("profile section: %s, density %.3f\n", var.bf16 ? "bf16" : "fp32", got);
      for (int i = 0; i < 2; ++i) {
        // Markers for the profile's reader: a one-element SiLU (grid 1) before and after the timed pass.
        if (i == 1) cuda::silu_forward(1, lx.data(), lout.data(), s);
        dev.forward(sh.B, sh.L, lx.data(), nullptr, lout.data(), s);
        dev.backward(ldy.data(), ldx.data(), s);
        if (i == 1) cuda::silu_forward(1, lx.data(), lout.data(), s);
      }
      stream.synchronize();
    }
    std::printf("profile run done\n");
    if (json) std::fclose(json);
    return 0;
  }
  for (const LayerRun& run : runs) {
    const int L = run.L;
    const int B = N / L;
    SeqBoatLayerConfig lc;
    lc.rel_pos = run.pos;
    lc.embed_dim = sh.D;
    lc.zdim = sh.Z;
    lc.hdim = sh.H;
    lc.ndim = 16;
    lc.window_size = sh.W;
    lc.max_positions = L;
    SeqBoatLayer<float> cpu(lc, 7);
    cuda::SeqBoatLayerDevice dev = cuda::SeqBoatLayerDevice::from_cpu(cpu);
    for (double target : {0.1, 0.5, 1.0}) {
      const double got = cuda::steer_density(dev, B, L, lx.data(), lout.data(), target, s);
      struct Variant {
        bool bf16, host_s;
        const char* name;
      };
      const Variant variants[] = {{false, false, "fp32"}, {true, false, "bf16-proj"}, {true, true, "bf16-proj host-S"}};
      for (const Variant& var : variants) {
        const bool bf16 = var.bf16;
        dev.set_bf16_projections(bf16);
        dev.set_host_compressed_length(var.host_s);
        const float ms_f = cuda::time_median_ms([&] { dev.forward(B, L, lx.data(), nullptr, lout.data(), s); }, s, reps);
        const float ms_fb = cuda::time_median_ms([&] {
          dev.forward(B, L, lx.data(), nullptr, lout.data(), s);
          dev.backward(ldy.data(), ldx.data(), s);
        }, s, reps);
        char name[128];
        std::snprintf(name, sizeof name, "B=%d L=%d D=512 Z=128 H=1024 N=16 W=256 %s %s", B, L,
                      run.pos == ops::PositionEncoding::rotary ? "rotary" : "simple(P=L)",
                      var.name);
        std::printf("layer | %-58s | density %.3f | forward %8.3f ms | forward+backward %8.3f ms\n", name, got, ms_f,
                    ms_fb);
        if (json)
          std::fprintf(json, "{\"device\": \"%s\", \"what\": \"layer\", \"config\": \"%s\", \"density\": %.4f, "
                             "\"fwd_ms\": %.5f, \"fwd_bwd_ms\": %.5f}\n", device.c_str(), name, got, ms_f, ms_fb);
      }
      dev.set_bf16_projections(false);
      dev.set_host_compressed_length(false);
    }
  }
  if (json) std::fclose(json);
  return 0;
}
