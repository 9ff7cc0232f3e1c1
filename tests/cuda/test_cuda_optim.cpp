// DeviceOptimizer (sma/cuda/optimizer.hpp) against sma::optim's CPU updates: for every kind (AdamW, RAdam, SGD with
// and without Nesterov), several steps over ranges of a toy model (two spanning more than one chunk, one without
// decay, one of size zero, a buffer left out) equal sma::optim::Adam / Sgd over the same TrainableView, with and
// without clipping and zero_grads; the adamw kind is bitwise DeviceAdamW; the errors are named.
#include "cuda_test_support.hpp"

#include <sma/cuda/optimizer.hpp>
#include <sma/optim/adam.hpp>
#include <sma/optim/optimizer.hpp>
#include <sma/optim/sgd.hpp>

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

struct Toy {
  Param<float> a{"a", {3, 1500}};  // 4500 elements: two chunks of the device table (4096 each)
  Param<float> bias{"bias", {7}};
  Param<float> empty{"empty", {0}};
  Param<float> running{"running", {5}, ParamKind::buffer};
  Param<float> c{"c", {2, 4100}};  // 8200: three chunks, the last of 8
  template <class V>
  void visit_params(V&& v) {
    v("a", a);
    v("bias", bias);
    v("empty", empty);
    v("running", running);
    v("c", c);
  }
};

struct Options {
  cuda::DeviceOptimizerKind kind = cuda::DeviceOptimizerKind::adamw;
  bool nesterov = false;
  double clip = 0;  // global-norm clipping (0: off)
  bool zero_grads = false;
  int steps = 7;     // RAdam's rectification starts at step 6
  double lr = 1e-2;
};

/// Max over the trainable elements of |device - CPU| / max(|CPU|, 1) after each step; also checks the buffer, the
/// cleared gradients and the clipping norm.
double run_case(const Options& o) {
  INFO("kind " << cuda::to_string(o.kind) << (o.nesterov ? " nesterov" : "") << " clip " << o.clip
               << " zero_grads " << o.zero_grads);
  Toy toy;
  ParamBuffer<float> buf(toy);
  std::mt19937 rng(17 + static_cast<unsigned>(o.kind) * 5 + (o.nesterov ? 1 : 0) + (o.clip > 0 ? 2 : 0));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (Index i = 0; i < buf.size(); ++i) buf.values()[i] = nd(rng);
  toy.running.fill(3.f);
  const optim::TrainableView<float> view(buf, [](const std::string& n) { return n == "a" || n == "c"; });

  cuda::DeviceOptimizerConfig dc;
  dc.kind = o.kind;
  dc.beta1 = 0.9;
  dc.beta2 = 0.98;
  dc.eps = 1e-8;
  dc.momentum = 0.9;
  dc.nesterov = o.nesterov;
  dc.weight_decay = 0.05;
  dc.clip_norm = o.clip;
  std::optional<optim::Adam<float>> adam;
  std::optional<optim::Sgd<float>> sgd;
  if (o.kind == cuda::DeviceOptimizerKind::sgd) {
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
    c.variant = o.kind == cuda::DeviceOptimizerKind::radam ? optim::AdamVariant::radam : optim::AdamVariant::adamw;
    adam.emplace(buf, c, view);
  }

  const std::size_t n = static_cast<std::size_t>(buf.size());
  cuda::DeviceArray<float> w(std::vector<float>(buf.values(), buf.values() + n));
  cuda::DeviceArray<float> g(n);
  std::vector<cuda::OptimizerRange> ranges;
  for (const auto& r : view.ranges)
    ranges.push_back({w.data() + r.offset, g.data() + r.offset, static_cast<long long>(r.size), r.decay});
  ranges.push_back({nullptr, nullptr, 0, true});  // a zero-size range may have null pointers
  REQUIRE(ranges.size() == 5);                    // a, bias, empty (size 0), c, the null one; not the buffer
  cuda::DeviceOptimizer dev(ranges, dc);
  REQUIRE(dev.kind() == o.kind);
  REQUIRE(dev.size() == view.total);
  REQUIRE((dev.adamw() != nullptr) == (o.kind == cuda::DeviceOptimizerKind::adamw));

  cuda::Stream stream;
  void* s = stream.handle();
  double worst = 0;
  for (int step = 0; step < o.steps; ++step) {
    for (std::size_t i = 0; i < n; ++i) buf.grads()[i] = nd(rng) * (1.f + 0.3f * static_cast<float>(step));
    g.upload(std::vector<float>(buf.grads(), buf.grads() + n), s);
    const std::vector<float> g_before(buf.grads(), buf.grads() + n);
    const double norm = optim::clip_grad_norm(buf, o.clip);
    if (adam) adam->step(o.lr);
    if (sgd) sgd->step(o.lr);
    dev.step(o.lr, s, o.zero_grads);
    const std::vector<float> wd = w.download(s), gd = g.download(s);
    for (const auto& r : view.ranges)
      for (Index i = r.offset; i < r.offset + r.size; ++i) {
        const double c = buf.values()[i];
        worst = std::max(worst, std::abs(double(wd[static_cast<std::size_t>(i)]) - c) / std::max(std::abs(c), 1.0));
      }
    // The buffer is nobody's range: its values stay, its gradients stay uploaded.
    const Index off = buf.entries()[3].offset;
    REQUIRE(buf.entries()[3].name == "running");
    for (Index i = off; i < off + 5; ++i) {
      CHECK(wd[static_cast<std::size_t>(i)] == 3.f);
      CHECK(gd[static_cast<std::size_t>(i)] == g_before[static_cast<std::size_t>(i)]);
    }
    // The stored gradients are read, never rescaled; with zero_grads they are cleared.
    bool grads_ok = true;
    for (const auto& r : view.ranges)
      for (Index i = r.offset; i < r.offset + r.size; ++i) {
        const auto k = static_cast<std::size_t>(i);
        grads_ok = grads_ok && gd[k] == (o.zero_grads ? 0.f : g_before[k]);
      }
    CHECK(grads_ok);
    if (o.clip > 0) {
      REQUIRE(norm > o.clip);  // clipping acts (not a vacuous pass)
      CHECK(dev.last_grad_norm(s) == Approx(norm).epsilon(1e-12));
    }
  }
  CHECK(dev.steps() == o.steps);
  return worst;
}

}  // namespace

TEST_CASE("cuda DeviceOptimizer matches sma::optim (AdamW, RAdam, SGD; clipping, zero_grads)", "[cuda][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  using K = cuda::DeviceOptimizerKind;
  for (K kind : {K::adamw, K::radam, K::sgd})
    for (bool nesterov : {false, true})
      for (double clip : {0.0, 20.0})
        for (bool zero_grads : {false, true}) {
          if (nesterov && kind != K::sgd) continue;
          Options o;
          o.kind = kind;
          o.nesterov = nesterov;
          o.clip = clip;
          o.zero_grads = zero_grads;
          // DeviceAdamW rounds w (1 - lr wd) before subtracting the step, which drifts from the CPU by about an ulp
          // a step (host emulation: 4.7e-7 after 4 steps, 7.1e-7 after 7); RAdam and SGD round once, as the CPU.
          o.steps = kind == K::adamw ? 4 : 7;
          const double err = run_case(o);
          INFO(cuda::to_string(kind) << (nesterov ? " nesterov" : "") << " clip " << clip << " zero_grads "
                                     << zero_grads << ": max |dev - cpu| / max(|cpu|, 1) = " << err);
          CHECK(err <= 1e-6);
        }
}

TEST_CASE("cuda DeviceOptimizer's adamw kind is DeviceAdamW, bitwise", "[cuda][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::size_t n = 9000;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> w0(n), gh(n);
  for (float& x : w0) x = nd(rng);
  cuda::DeviceArray<float> wa(w0), wb(w0), ga(n), gb(n);
  auto ranges = [&](cuda::DeviceArray<float>& w, cuda::DeviceArray<float>& g) {
    return std::vector<cuda::OptimizerRange>{{w.data(), g.data(), 5000, true},
                                             {w.data() + 5000, g.data() + 5000, 4000, false}};
  };
  for (double clip : {0.0, 10.0}) {
    cuda::AdamWConfig ac;
    ac.weight_decay = 0.1;
    ac.clip_norm = clip;
    cuda::DeviceAdamW a(ranges(wa, ga), ac);
    cuda::DeviceOptimizer b(ranges(wb, gb), ac);
    CHECK(b.kind() == cuda::DeviceOptimizerKind::adamw);
    CHECK(b.config().weight_decay == 0.1);
    CHECK(b.config().clip_norm == clip);
    for (int step = 0; step < 4; ++step) {
      for (float& x : gh) x = nd(rng);
      ga.upload(gh);
      gb.upload(gh);
      a.step(1e-2, nullptr, step % 2 == 1);
      b.step(1e-2, nullptr, step % 2 == 1);
    }
    CHECK(cuda_test::bitwise_equal(wa.download(), wb.download()));
    CHECK(cuda_test::bitwise_equal(ga.download(), gb.download()));
    CHECK(b.steps() == 4);
    if (clip > 0) CHECK(a.last_grad_norm() == b.last_grad_norm());
  }
}

TEST_CASE("cuda DeviceOptimizer names bad input", "[cuda][optim]") {
  CHECK(cuda::parse_device_optimizer("adam") == cuda::DeviceOptimizerKind::adamw);
  CHECK(cuda::parse_device_optimizer("radam") == cuda::DeviceOptimizerKind::radam);
  CHECK(cuda::parse_device_optimizer("sgd") == cuda::DeviceOptimizerKind::sgd);
  CHECK(std::string(cuda::to_string(cuda::DeviceOptimizerKind::radam)) == "radam");
  CHECK_THROWS_WITH(cuda::parse_device_optimizer("lion"), Catch::Contains("unknown device optimiser 'lion'"));
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  cuda::DeviceArray<float> w(16), g(16);
  w.fill_bytes(0);
  g.fill_bytes(0);
  const std::vector<cuda::OptimizerRange> ok{{w.data(), g.data(), 16, true}};
  cuda::DeviceOptimizerConfig c;
  c.kind = cuda::DeviceOptimizerKind::radam;
  c.beta2 = 1.0;
  CHECK_THROWS_WITH(cuda::DeviceOptimizer(ok, c), Catch::Contains("betas must be in [0, 1)"));
  c.beta2 = 0.98;
  c.eps = 0;
  CHECK_THROWS_WITH(cuda::DeviceOptimizer(ok, c), Catch::Contains("eps must be > 0"));
  c = cuda::DeviceOptimizerConfig{};
  c.kind = cuda::DeviceOptimizerKind::sgd;
  c.momentum = 1.0;
  CHECK_THROWS_WITH(cuda::DeviceOptimizer(ok, c), Catch::Contains("momentum must be in [0, 1)"));
  c.momentum = 0.9;
  c.clip_norm = std::nan("");
  CHECK_THROWS_WITH(cuda::DeviceOptimizer(ok, c), Catch::Contains("clip_norm must be finite"));
  c.clip_norm = 0;
  c.weight_decay = INFINITY;
  CHECK_THROWS_WITH(cuda::DeviceOptimizer(ok, c), Catch::Contains("weight_decay must be finite"));
  c.weight_decay = 0;
  CHECK_THROWS_WITH(cuda::DeviceOptimizer({{w.data(), g.data(), -1, true}}, c), Catch::Contains("negative size"));
  CHECK_THROWS_WITH(cuda::DeviceOptimizer({{nullptr, g.data(), 4, true}}, c), Catch::Contains("null pointer"));
  cuda::DeviceOptimizer sgd(ok, c);
  CHECK(std::string(sgd.name()) == "sgd");
  CHECK_THROWS_WITH(sgd.last_grad_norm(), Catch::Contains("clipping is off"));
  c.clip_norm = 1;
  cuda::DeviceOptimizer clipped(ok, c);
  CHECK_THROWS_WITH(clipped.last_grad_norm(), Catch::Contains("no step"));
  // Only zero-size ranges: steps count, nothing runs.
  cuda::DeviceOptimizer none({{nullptr, nullptr, 0, true}}, c);
  none.step(1e-2);
  CHECK(none.steps() == 1);
  CHECK(none.size() == 0);
}

TEST_CASE("cuda DeviceOptimizer: prepare_step + step_prepared equal step, bitwise", "[cuda][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::size_t n = 9000;
  std::mt19937 rng(8);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> w0(n), gh(n);
  for (float& x : w0) x = nd(rng);
  using K = cuda::DeviceOptimizerKind;
  for (K kind : {K::adamw, K::radam, K::sgd})
    for (double clip : {0.0, 10.0}) {
      INFO(cuda::to_string(kind) << " clip " << clip);
      cuda::DeviceArray<float> wa(w0), wb(w0), ga(n), gb(n);
      auto ranges = [&](cuda::DeviceArray<float>& w, cuda::DeviceArray<float>& g) {
        return std::vector<cuda::OptimizerRange>{{w.data(), g.data(), 5000, true},
                                                 {w.data() + 5000, g.data() + 5000, 4000, false}};
      };
      cuda::DeviceOptimizerConfig c;
      c.kind = kind;
      c.nesterov = true;
      c.weight_decay = 0.1;
      c.clip_norm = clip;
      cuda::DeviceOptimizer a(ranges(wa, ga), c), b(ranges(wb, gb), c);
      cuda::Stream stream;
      void* s = stream.handle();
      for (int step = 0; step < 7; ++step) {  // RAdam's rectified branch from step 6
        for (float& x : gh) x = nd(rng);
        ga.upload(gh, s);
        gb.upload(gh, s);
        a.step(1e-2, s, step % 2 == 1);
        b.prepare_step(1e-2, s);
        b.step_prepared(s, step % 2 == 1);
      }
      CHECK(cuda_test::bitwise_equal(wa.download(s), wb.download(s)));
      CHECK(cuda_test::bitwise_equal(ga.download(s), gb.download(s)));
      CHECK(b.steps() == 7);
    }
}
