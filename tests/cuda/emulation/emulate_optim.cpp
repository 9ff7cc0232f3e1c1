// tests/cuda/emulation/emulate_optim.cpp: runs DeviceOptimizer's kernels (cuda/model/optim_kernels.cuh: the
// clipping pair, RAdam, SGD) on the host (see cuda_runtime.h beside this file) over a chunk table built as
// ChunkTable builds it, with the per-step scalars of radam_args / sgd_args, and compares every step with
// sma::optim::Adam (radam variant) / sma::optim::Sgd and clip_grad_norm, as tests/cuda/test_cuda_optim.cpp does on a
// device; every other step the update reads its scalars through the dev_args pointer (a replayed step graph's
// path). Not part of the build. From the repository root (a minute on 2 cores):
//   g++ -std=c++20 -O1 -I tests/cuda/emulation -I include -I cuda -I /usr/include/eigen3 -DEIGEN_MPL2_ONLY \
//       tests/cuda/emulation/emulate_optim.cpp -pthread -o /tmp/emulate_optim && /tmp/emulate_optim
#include <cuda_runtime.h>
#include <model/optim_kernels.cuh>

#include <sma/optim/adam.hpp>
#include <sma/optim/optimizer.hpp>
#include <sma/optim/sgd.hpp>

#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace sma;
namespace ch = sma::cuda::chunked;
using K = cuda::DeviceOptimizerKind;

namespace {

struct Toy {
  Param<float> a{"a", {3, 1500}};
  Param<float> bias{"bias", {7}};
  Param<float> empty{"empty", {0}};
  Param<float> running{"running", {5}, ParamKind::buffer};
  Param<float> c{"c", {2, 4100}};
  template <class V>
  void visit_params(V&& v) {
    v("a", a);
    v("bias", bias);
    v("empty", empty);
    v("running", running);
    v("c", c);
  }
};

// Returns the worst |emulated - CPU| / max(|CPU|, 1) over the steps, or -1 on a failed side check.
double run_case(K kind, bool nesterov, double clip, bool zero_grads, int steps) {
  Toy toy;
  ParamBuffer<float> buf(toy);
  std::mt19937 rng(17 + static_cast<unsigned>(kind) * 5 + (nesterov ? 1 : 0) + (clip > 0 ? 2 : 0));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (Index i = 0; i < buf.size(); ++i) buf.values()[i] = nd(rng);
  toy.running.fill(3.f);
  const optim::TrainableView<float> view(buf, [](const std::string& n) { return n == "a" || n == "c"; });
  cuda::DeviceOptimizerConfig dc;
  dc.kind = kind;
  dc.nesterov = nesterov;
  dc.weight_decay = 0.05;
  dc.clip_norm = clip;
  std::optional<optim::Adam<float>> adam;
  std::optional<optim::Sgd<float>> sgd;
  if (kind == K::sgd) {
    optim::Sgd<float>::Config c;
    c.momentum = dc.momentum;
    c.nesterov = dc.nesterov;
    c.weight_decay = dc.weight_decay;
    sgd.emplace(buf, c, view);
  } else {
    optim::Adam<float>::Config c;
    c.beta1 = dc.beta1;
    c.beta2 = dc.beta2;
    c.eps = dc.eps;
    c.weight_decay = dc.weight_decay;
    c.variant = optim::AdamVariant::radam;
    adam.emplace(buf, c, view);
  }
  const std::size_t n = static_cast<std::size_t>(buf.size());
  std::vector<float> w(buf.values(), buf.values() + n), g(n);
  // ChunkTable's construction, on host memory.
  std::vector<ch::RangeDesc> rd;
  std::vector<ch::ChunkDesc> cd;
  long long total = 0;
  for (const auto& r : view.ranges) {
    if (r.size == 0) continue;
    const int idx = static_cast<int>(rd.size());
    rd.push_back({w.data() + r.offset, g.data() + r.offset, total, r.size, r.decay ? 1 : 0});
    for (long long s = 0; s < r.size; s += ch::kChunk) cd.push_back({idx, s});
    total += r.size;
  }
  std::vector<float> m(static_cast<std::size_t>(total), 0.f), v(m);
  std::vector<double> partial(cd.size()), norm(1);
  std::vector<float> scale(1);
  const dim3 grid(static_cast<unsigned>(cd.size()));
  double worst = 0;
  bool ok = true;
  int adaptive_steps = 0;
  for (int step = 1; step <= steps; ++step) {
    for (std::size_t i = 0; i < n; ++i) buf.grads()[i] = nd(rng) * (1.f + 0.3f * static_cast<float>(step - 1));
    std::copy(buf.grads(), buf.grads() + n, g.begin());
    const std::vector<float> g_before = g;
    const double cpu_norm = optim::clip_grad_norm(buf, clip);
    if (adam) adam->step(1e-2);
    if (sgd) sgd->step(1e-2);
    const float* sc = nullptr;
    if (clip > 0) {
      emu::launch(grid, [&] { ch::grad_square_kernel(rd.data(), cd.data(), partial.data()); });
      emu::launch(dim3(1), [&] {
        ch::clip_scale_kernel(static_cast<int>(cd.size()), partial.data(), clip, norm.data(), scale.data());
      });
      sc = scale.data();
      if (!(cpu_norm > clip) || std::abs(norm[0] - cpu_norm) > 1e-12 * cpu_norm) {
        std::printf("  step %d: norm %.17g against the CPU's %.17g (clip %g)\n", step, norm[0], cpu_norm, clip);
        ok = false;
      }
    }
    if (kind == K::radam) {
      const ch::RAdamArgs a = ch::radam_args(dc, step, 1e-2);
      // Every other step the scalars come from "device" memory, as in a replayed step graph.
      const ch::RAdamArgs* dev = step % 2 ? &a : nullptr;
      const ch::RAdamArgs host = dev ? ch::RAdamArgs{} : a;
      emu::launch(grid, [&] { ch::radam_kernel(rd.data(), cd.data(), m.data(), v.data(), host, dev, zero_grads, sc); });
      adaptive_steps += a.adaptive;
    } else {
      const ch::SgdArgs a = ch::sgd_args(dc, step, 1e-2);
      const ch::SgdArgs* dev = step % 2 ? &a : nullptr;
      const ch::SgdArgs host = dev ? ch::SgdArgs{} : a;
      emu::launch(grid, [&] { ch::sgd_kernel(rd.data(), cd.data(), m.data(), host, dev, zero_grads, sc); });
    }
    for (const auto& r : view.ranges)
      for (Index i = r.offset; i < r.offset + r.size; ++i) {
        const auto k = static_cast<std::size_t>(i);
        const double c = buf.values()[i];
        worst = std::max(worst, std::abs(double(w[k]) - c) / std::max(std::abs(c), 1.0));
        if (g[k] != (zero_grads ? 0.f : g_before[k])) ok = false;
      }
    const Index off = buf.entries()[3].offset;
    for (Index i = off; i < off + 5; ++i)
      if (w[static_cast<std::size_t>(i)] != 3.f) ok = false;
  }
  if (kind == K::radam && adaptive_steps != 2) {  // steps 6 and 7 of 7 (beta2 0.98): both branches ran
    std::printf("  %d adaptive RAdam steps, expected 2\n", adaptive_steps);
    ok = false;
  }
  return ok ? worst : -1;
}

}  // namespace

int main() {
  int failed = 0;
  for (K kind : {K::radam, K::sgd})
    for (bool nesterov : {false, true})
      for (double clip : {0.0, 20.0})
        for (bool zero_grads : {false, true}) {
          if (nesterov && kind != K::sgd) continue;
          const double err = run_case(kind, nesterov, clip, zero_grads, 7);
          const bool pass = err >= 0 && err <= 1e-6;
          failed += pass ? 0 : 1;
          std::printf("%-5s%s clip %4.1f zero_grads %d: max |emulated - cpu| / max(|cpu|, 1) = %.3g %s\n",
                      kind == K::radam ? "radam" : "sgd", nesterov ? " nesterov" : "", clip, zero_grads ? 1 : 0, err,
                      pass ? "ok" : "FAIL");
        }
  std::printf("%s\n", failed ? "FAILED" : "all cases within 1e-6");
  return failed ? 1 : 0;
}
