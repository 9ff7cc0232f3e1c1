// tests/cuda/emulation/emulate_stream.cpp: runs the device streamer's kernels (cuda/seqboat/stream_kernels.cuh) on
// the host (see cuda_runtime.h beside this file), with the launcher's sequence of SeqBoatLayerStreamerDevice::step
// (cuda/seqboat/seqboat_stream.cu) and host stand-ins for what it takes from elsewhere (the norm, the three cuBLAS
// products, the router), and compares every step with the CPU's SeqBoatLayerStreamer<float>.
// Build and run from the repository root (a few minutes on 2 cores):
//   g++ -std=c++20 -O1 -I tests/cuda/emulation -I include -I cuda -I tests/cuda -I /usr/include/eigen3 \
//       -DEIGEN_MPL2_ONLY tests/cuda/emulation/emulate_stream.cpp -pthread -o /tmp/emulate_stream && /tmp/emulate_stream
#include <cuda_runtime.h>
#include <seqboat/stream_kernels.cuh>
#include <stream_setup.hpp>

#include <sma/models/seqboat_stream.hpp>

#include <cstdio>
#include <vector>

using namespace sma;
using AA = ops::AttentionActivation;
using PE = ops::PositionEncoding;
namespace st = sma::cuda::stream;

template <class Kernel>
static void run(dim3 grid, Kernel k, const st::StepArgs& a) {
  emu::launch(grid, [&] { k(a); });
}

static const float* param(SeqBoatLayer<float>& L, const std::string& want) {
  const float* out = nullptr;
  for_each_param(L, [&](const std::string& name, Param<float>& p) {
    if (name == want) out = p.data();
  });
  return out;
}

static int run_case(const stream_test::StreamCase& k, Index T) {
  const Index B = 3;
  SeqBoatLayer<float> L(stream_test::stream_config(k), k.seed);
  stream_test::steer_router(L, k.seed);
  const auto& c = L.config();
  const int D = int(c.embed_dim), N = int(c.ndim), Z = int(c.zdim), H = int(c.hdim), W = int(c.window_size),
            K = int(c.truncation), P = Z + 2 * H, ldh = (2 + D + 7) / 8 * 8;
  const Tensor3<float> x = stream_test::steered_input<float>(B, T, D, k.seed + 1);
  SeqBoatLayerStreamer<float> cpu(L);
  auto cst = cpu.make_state(B);

  std::vector<float> ema(B * D * N, 0.f), hist(B * K * D + 1, 0.f), keys(B * W * Z, 0.f), values(B * W * H, 0.f),
      last_gate(B, 0.f), xin(B * D), mx(B * D), hu(B * ldh), gate(B), base(B * P), q(B * Z), kk(B * Z), r(B * H),
      v(B * H), scores(B * (W + 1)), hr(B * H), hc(B * D), out(B * D), xt(B * D);
  std::vector<long long> key_pos(B * W, 0), pos(B, 0), activated(B, 0);
  std::vector<std::uint8_t> last_active(B, 0), active(B, 0);
  st::StepArgs a;
  a.B = int(B), a.D = D, a.N = N, a.Z = Z, a.H = H, a.W = W, a.K = K, a.ldh = ldh;
  a.position = int(c.rel_pos);
  a.activation = int(c.attention_activation);
  a.max_positions = int(c.max_positions);
  a.rotary_theta = L.gau().config().attention.rotary_theta;
  a.query_scale = float(L.gau().config().attention.query_scale(Z));
  a.delta = param(L, "ssm.delta"), a.alpha = param(L, "ssm.alpha"), a.beta = param(L, "ssm.beta");
  a.gamma = param(L, "ssm.gamma"), a.omega = param(L, "ssm.omega");
  a.hx_bias = param(L, "hx_proj.bias"), a.mx_bias = param(L, "mx_proj.bias"), a.qk_gamma = param(L, "gamma");
  a.qk_beta = param(L, "beta"), a.h_bias = param(L, "h_proj.bias"), a.table = param(L, "rel_pos_bias.rel_pos_bias");
  a.ema = ema.data(), a.history = hist.data(), a.keys = keys.data(), a.values = values.data();
  a.key_pos = key_pos.data(), a.pos = pos.data(), a.activated = activated.data(), a.last_active = last_active.data();
  a.last_gate = last_gate.data(), a.x = xt.data(), a.xin = c.prenorm ? xin.data() : xt.data(), a.mx = mx.data();
  a.hu = hu.data(), a.active = active.data(), a.gate = gate.data(), a.base = base.data(), a.q = q.data();
  a.k = kk.data(), a.r = r.data(), a.v = v.data(), a.scores = scores.data(), a.hr = hr.data(), a.hc = hc.data();
  a.out = out.data();
  const float* hx_w = param(L, "hx_proj.weight");
  const float* mx_w = param(L, "mx_proj.weight");
  const float* h_w = param(L, "h_proj.weight");
  const float temp = *param(L, "q_router.temp");
  Context ctx(Mode::eval);
  auto norm = [&](const std::vector<float>& in) {
    Tensor3<float> t(B, 1, D);
    std::copy(in.begin(), in.end(), t.data());
    typename SequenceNorm<float>::Cache nc;
    const Tensor3<float> y = L.norm().forward(ctx, t, nc);
    return std::vector<float>(y.data(), y.data() + y.size());
  };

  double worst = 0;
  int mismatched = 0;
  Index n_act[3] = {0, 0, 0};
  for (Index t = 0; t < T; ++t) {
    Tensor2<float> x2(B, D);
    for (Index b = 0; b < B; ++b)
      for (int d = 0; d < D; ++d) x2(b, d) = xt[b * D + d] = x(b, t, d);
    StreamTrace trace;
    const Tensor2<float> want = cpu.step(x2, cst, &trace);

    if (c.prenorm) {
      const std::vector<float> n = norm(xt);
      std::copy(n.begin(), n.end(), xin.begin());  // a.xin points into xin
    }
    run(dim3(unsigned((B * D + 255) / 256)), st::ema_step_kernel, a);
    for (Index b = 0; b < B; ++b)
      for (int j = 0; j < 2 + D; ++j) {
        float s = 0;
        for (int d = 0; d < D; ++d) s += mx[b * D + d] * hx_w[j * D + d];
        hu[b * ldh + j] += s;
      }
    for (Index b = 0; b < B; ++b) {  // the router kernel's arithmetic (cuda/layer_ops/layer_ops.cu)
      const float inv_tau = float(std::exp(-double(temp)));
      const float s0 = hu[b * ldh] * inv_tau, s1 = hu[b * ldh + 1] * inv_tau, m = std::max(s0, s1);
      const float e0 = std::exp(s0 - m), e1 = std::exp(s1 - m), p0 = e0 / (e0 + e1), p1 = e1 / (e0 + e1);
      active[b] = p1 > p0;
      gate[b] = active[b] ? p1 : 0.f;
      if (active[b] != trace.active(b, 0)) ++mismatched;
      n_act[b] += active[b];
    }
    for (Index b = 0; b < B; ++b)
      for (int j = 0; j < P; ++j) {
        float s = 0;
        for (int d = 0; d < D; ++d) s += mx[b * D + d] * mx_w[j * D + d];
        base[b * P + j] = s;
      }
    std::fill(hr.begin(), hr.end(), std::nanf(""));  // the value kernel must write every row
    run(dim3(unsigned(B)), st::prep_kernel, a);
    run(dim3(unsigned((W + 1 + 7) / 8), unsigned(B)), st::score_kernel, a);
    run(dim3(unsigned((H + 31) / 32), unsigned(B)), st::value_kernel, a);
    for (Index b = 0; b < B; ++b)
      for (int d = 0; d < D; ++d) {
        float s = 0;
        for (int h = 0; h < H; ++h) s += hr[b * H + h] * h_w[d * H + h];
        hc[b * D + d] = s;
      }
    run(dim3(unsigned(B)), st::output_kernel, a);
    const std::vector<float> y = c.prenorm ? out : norm(out);
    double err = 0, scale = 0;
    for (Index i = 0; i < B * D; ++i) {
      err = std::max(err, double(std::abs(y[i] - want.data()[i])));
      if (std::isnan(y[i])) err = INFINITY;
      scale = std::max(scale, double(std::abs(want.data()[i])));
    }
    worst = std::max(worst, err / std::max(scale, 1e-3));
  }
  bool counts_ok = true;
  for (Index b = 0; b < B; ++b) counts_ok &= activated[b] == cst.activated[b] && pos[b] == cst.position[b];
  const bool ok = worst < 2e-5 && mismatched == 0 && counts_ok && n_act[0] == 0 && n_act[1] == T;
  std::printf("%-28s rel err %.2e, decisions mismatched %d, activated %lld %lld %lld, counts %s: %s\n", k.name, worst,
              mismatched, activated[0], activated[1], activated[2], counts_ok ? "equal" : "DIFFER",
              ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  const std::vector<stream_test::StreamCase> cases = {
      {"relu2 simple prenorm", AA::relu2, PE::simple, 4, 0, true, NormType::layernorm, 3},
      {"softmax rotary postnorm K6", AA::softmax, PE::rotary, 5, 6, false, NormType::rmsnorm, 5},
      {"laplace local_simple", AA::laplace, PE::local_simple, 3, 0, true, NormType::rmsnorm, 7},
      {"softmax none batchnorm W40", AA::softmax, PE::none, 40, 0, false, NormType::batchnorm, 9},
      {"softmax simple W260 (2 chunks)", AA::softmax, PE::simple, 260, 0, true, NormType::layernorm, 11},
  };
  int fails = 0;
  for (std::size_t i = 0; i < cases.size(); ++i)
    if (argc < 2 || std::atoi(argv[1]) == int(i)) fails += run_case(cases[i], i == 4 ? 280 : 30);
  std::printf("%d failure(s)\n", fails);
  return fails ? 1 : 0;
}
