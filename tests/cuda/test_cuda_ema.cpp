// sma::cuda::ema_forward / ema_backward against MultiHeadEma (the CPU layer) in double and float: causal and
// bidirectional, truncated kernels, ragged (padded) rows, orders beyond one register group (N > 16), lengths that
// are not a multiple of the segment, several segments per row; the accuracy rule of cuda_test_support.hpp for the
// output, dx and every parameter gradient (added into pre-filled gradients). Untruncated shapes take the register-tile
// path (segments of 16, 32 or 64 steps, SMA_CUDA_EMA_SEG), truncated ones and very long rows the generic path.
#include "cuda_test_support.hpp"

#include <sma/cuda/ema.hpp>
#include <sma/layers/ema.hpp>

#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

struct EmaCase {
  int B, L, D, N;
  bool bidir;
  int trunc;
  bool ragged;
  unsigned seed;
};

void check_ema(const EmaCase& ec) {
  INFO("B=" << ec.B << " L=" << ec.L << " D=" << ec.D << " N=" << ec.N << " bidir=" << ec.bidir
            << " trunc=" << ec.trunc << " ragged=" << ec.ragged);
  typename MultiHeadEma<double>::Config cd;
  cd.dim = ec.D;
  cd.ndim = ec.N;
  cd.direction = ec.bidir ? Direction::bidirectional : Direction::causal;
  cd.truncation = ec.trunc;
  MultiHeadEma<double> ld(cd, ec.seed);
  typename MultiHeadEma<float>::Config cf;
  cf.dim = ec.D;
  cf.ndim = ec.N;
  cf.direction = cd.direction;
  cf.truncation = ec.trunc;
  MultiHeadEma<float> lf(cf, ec.seed);
  // The float layer gets the double layer's parameters rounded to float, and the double layer is then set to
  // exactly those values, so that both references see the same function.
  std::map<std::string, Param<double>*> pd;
  ld.visit_params([&](const auto& name, Param<double>& p) { pd[std::string(name)] = &p; });
  std::map<std::string, Param<float>*> pf;
  lf.visit_params([&](const auto& name, Param<float>& p) { pf[std::string(name)] = &p; });
  for (auto& [name, p] : pd) {
    Param<float>& f = *pf.at(name);
    for (Index i = 0; i < p->size(); ++i) {
      f.data()[i] = static_cast<float>(p->data()[i]);
      p->data()[i] = static_cast<double>(f.data()[i]);
    }
    p->zero_grad();
    f.zero_grad();
  }

  std::mt19937 rng(ec.seed * 7 + 1);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int B = ec.B, L = ec.L, D = ec.D;
  Tensor3<double> x(B, L, D), dy(B, L, D);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(nd(rng));
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = static_cast<float>(nd(rng));
  Tensor3<float> xf = x.cast<float>(), dyf = dy.cast<float>();
  Mask mask(B, L);
  mask.setZero();
  std::vector<std::uint8_t> flat(static_cast<std::size_t>(B) * L, 0);
  if (ec.ragged)
    for (int b = 0; b < B; ++b) {
      const int len = b == 0 ? L : std::max(0, L - (b * L) / (B + 1) - b);  // row 0 full, others shorter
      for (int t = len; t < L; ++t) {
        mask(b, t) = 1;
        flat[static_cast<std::size_t>(b) * L + t] = 1;
      }
    }
  Context ctx;
  if (ec.ragged) ctx.padding = &mask;
  typename MultiHeadEma<double>::Cache cached;
  typename MultiHeadEma<float>::Cache cachef;
  const Tensor3<double> yd = ld.forward(ctx, x, cached);
  const Tensor3<float> yf = lf.forward(ctx, xf, cachef);
  const Tensor3<double> dxd = ld.backward(ctx, dy, cached);
  const Tensor3<float> dxf = lf.backward(ctx, dyf, cachef);

  // Device.
  const std::size_t n = static_cast<std::size_t>(B) * L * D;
  cuda::Stream stream;
  cuda::DeviceArray<float> d_x(std::vector<float>(xf.data(), xf.data() + n));
  cuda::DeviceArray<float> d_dy(std::vector<float>(dyf.data(), dyf.data() + n));
  cuda::DeviceArray<std::uint8_t> d_mask(flat);
  cuda::DeviceArray<float> d_out(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()));
  cuda::DeviceArray<float> d_dx(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()));
  const float pre = 0.25f;  // gradients are ADDED: start from a known value
  std::map<std::string, cuda::DeviceArray<float>> dp, dg;
  for (auto& [name, p] : pf) {
    dp.emplace(name, cuda::DeviceArray<float>(std::vector<float>(p->data(), p->data() + p->size())));
    dg.emplace(name, cuda::DeviceArray<float>(std::vector<float>(static_cast<std::size_t>(p->size()), pre)));
  }
  cuda::EmaConfig cfg;
  cfg.batch = B;
  cfg.length = L;
  cfg.dim = D;
  cfg.order = ec.N;
  cfg.bidirectional = ec.bidir;
  cfg.truncation = ec.trunc;
  cuda::EmaParams prm{dp.at("delta").data(), dp.at("alpha").data(), dp.at("beta").data(), dp.at("gamma").data(),
                      dp.at("omega").data()};
  cuda::EmaGrads grads{dg.at("delta").data(), dg.at("alpha").data(), dg.at("beta").data(), dg.at("gamma").data(),
                       dg.at("omega").data()};
  const std::uint8_t* pm = ec.ragged ? d_mask.data() : nullptr;
  cuda::ema_forward(cfg, prm, d_x.data(), pm, d_out.data(), stream.handle());
  cuda::ema_backward(cfg, prm, d_x.data(), pm, d_dy.data(), d_dx.data(), grads, stream.handle());
  stream.synchronize();
  INFO("segment length " << cuda::ema_segment_length(cfg));

  const std::vector<float> out = d_out.download(), dx = d_dx.download();
  {
    const auto a = cuda_test::accuracy(out.data(), yf.data(), yd.data(), n);
    INFO("out: " << a);
    CHECK(a.ok());
  }
  {
    const auto a = cuda_test::accuracy(dx.data(), dxf.data(), dxd.data(), n);
    INFO("dx: " << a);
    CHECK(a.ok());
  }
  for (auto& [name, p] : pd) {
    const Param<float>& f = *pf.at(name);
    const std::size_t m = static_cast<std::size_t>(p->size());
    std::vector<double> ref(m);
    std::vector<float> cpu(m);
    for (std::size_t i = 0; i < m; ++i) {
      ref[i] = p->grad()[i] + pre;
      cpu[i] = f.grad()[i] + pre;
    }
    const std::vector<float> dev = dg.at(name).download();
    const auto a = cuda_test::accuracy(dev.data(), cpu.data(), ref.data(), m);
    INFO("d" << name << ": " << a);
    CHECK(a.ok());
  }
}

}  // namespace

TEST_CASE("cuda ema matches MultiHeadEma (causal, bidirectional, truncation, ragged)", "[cuda][ema][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::vector<EmaCase> cases = {
      {2, 37, 5, 2, false, 0, false, 1},    // one short segment, D below one warp
      {2, 37, 5, 2, true, 0, true, 2},      // bidirectional, ragged
      {3, 300, 40, 16, false, 0, true, 3},  // several segments, a partial last one
      {3, 300, 40, 16, true, 0, true, 4},
      {2, 257, 33, 3, false, 50, false, 5},  // truncation shorter than a segment and across segments
      {2, 257, 33, 3, true, 50, true, 6},
      {1, 200, 7, 20, true, 0, false, 7},   // N > 16: two order groups
      {2, 130, 9, 4, false, 129, true, 8},  // truncation just below L
      {1, 1, 3, 2, true, 0, false, 9},      // L = 1
  };
  for (const auto& c : cases) check_ema(c);
}

TEST_CASE("cuda ema register-tile path: segment lengths, odd N, partial warps", "[cuda][ema][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::vector<EmaCase> cases = {
      {2, 100, 33, 5, true, 0, true, 21},    // odd N (a lone last order), D one past a warp, partial segment
      {3, 129, 64, 1, false, 0, true, 22},   // N = 1
      {2, 64, 160, 16, true, 0, false, 23},  // the training shape's D, exact segments
      {1, 300, 17, 33, true, 0, true, 24},   // N > 32 (the backward apply's shared memory above 48 KB)
      {1, 90, 9, 112, true, 0, false, 26},   // 224 orders: past the apply's shared memory, the generic backward
      {2, 250, 40, 16, false, 250, true, 25},  // truncation = L: still the tile path
  };
  // The segment length is read from the environment on every call; each one runs every case.
  for (const char* seg : {"16", "64", "32"}) {
    INFO("SMA_CUDA_EMA_SEG=" << seg);
    ::setenv("SMA_CUDA_EMA_SEG", seg, 1);
    for (const auto& c : cases) check_ema(c);
  }
  ::unsetenv("SMA_CUDA_EMA_SEG");
}

TEST_CASE("cuda ema backward is deterministic (bitwise equal gradients over repeated calls)", "[cuda][ema][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (const int trunc : {0, 40}) {  // the tile path and the generic path
    INFO("truncation " << trunc);
    cuda::EmaConfig cfg;
    cfg.batch = 3;
    cfg.length = 700;
    cfg.dim = 48;
    cfg.order = 16;
    cfg.bidirectional = true;
    cfg.truncation = trunc;
    const std::size_t n = static_cast<std::size_t>(cfg.batch) * cfg.length * cfg.dim;
    const std::size_t rn = static_cast<std::size_t>(cfg.rows()) * cfg.order;
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.f, 1.f);
    const auto randv = [&](std::size_t m) {
      std::vector<float> v(m);
      for (float& e : v) e = nd(rng);
      return v;
    };
    cuda::Stream stream;
    cuda::DeviceArray<float> x(randv(n)), dy(randv(n)), dx(std::vector<float>(n, 0.f));
    cuda::DeviceArray<float> delta(randv(rn)), alpha(randv(rn)), beta(randv(rn)), gamma(randv(rn));
    cuda::DeviceArray<float> omega(randv(static_cast<std::size_t>(cfg.dim)));
    const cuda::EmaParams prm{delta.data(), alpha.data(), beta.data(), gamma.data(), omega.data()};
    std::vector<std::vector<float>> first;
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<cuda::DeviceArray<float>> g;
      for (int k = 0; k < 4; ++k) g.emplace_back(std::vector<float>(rn, 0.f));
      g.emplace_back(std::vector<float>(static_cast<std::size_t>(cfg.dim), 0.f));
      const cuda::EmaGrads grads{g[0].data(), g[1].data(), g[2].data(), g[3].data(), g[4].data()};
      cuda::ema_backward(cfg, prm, x.data(), nullptr, dy.data(), dx.data(), grads, stream.handle());
      stream.synchronize();
      for (int k = 0; k < 5; ++k) {
        const std::vector<float> h = g[static_cast<std::size_t>(k)].download();
        if (rep == 0)
          first.push_back(h);
        else
          CHECK(h == first[static_cast<std::size_t>(k)]);
      }
    }
    // With a residual, dx gains it: exactly on the tile path (added to the finished value), up to rounding on the
    // generic path (added to the first direction's partial, before the other terms).
    const std::vector<float> res = randv(n);
    cuda::DeviceArray<float> residual(res), dx2(std::vector<float>(n, 0.f));
    std::vector<cuda::DeviceArray<float>> g;
    for (int k = 0; k < 4; ++k) g.emplace_back(std::vector<float>(rn, 0.f));
    g.emplace_back(std::vector<float>(static_cast<std::size_t>(cfg.dim), 0.f));
    const cuda::EmaGrads grads{g[0].data(), g[1].data(), g[2].data(), g[3].data(), g[4].data()};
    cuda::ema_backward(cfg, prm, x.data(), nullptr, dy.data(), dx2.data(), grads, stream.handle(), residual.data());
    stream.synchronize();
    const std::vector<float> plain = dx.download(), with = dx2.download();
    std::size_t off = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const float want = plain[i] + res[i];
      off += trunc == 0 ? with[i] != want : std::abs(with[i] - want) > 1e-5f * (1.f + std::abs(want));
    }
    CHECK(off == 0);
  }
}

TEST_CASE("cuda ema long rows (many segments, carry chain)", "[cuda][ema]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_ema({2, 4096, 64, 16, true, 0, true, 11});
  check_ema({1, 8192, 128, 8, false, 1000, false, 12});
  // One narrow row of 3M steps: more than 65535 segments of 32, so the segments must grow (grid y limit).
  cuda::EmaConfig narrow;
  narrow.batch = 1;
  narrow.length = 3000000;
  narrow.dim = 1;
  narrow.order = 2;
  CHECK((narrow.length + cuda::ema_segment_length(narrow) - 1) / cuda::ema_segment_length(narrow) <= 65535);
  check_ema({1, 3000000, 1, 2, true, 0, false, 13});
}

TEST_CASE("cuda ema argument errors", "[cuda][ema][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  cuda::EmaConfig cfg;
  cfg.batch = 1;
  cfg.length = 4;
  cfg.dim = 0;
  cfg.order = 2;
  cuda::EmaParams prm;
  CHECK_THROWS_AS(cuda::ema_forward(cfg, prm, nullptr, nullptr, nullptr), ValueError);
  cfg.dim = 2;
  CHECK_THROWS_WITH(cuda::ema_forward(cfg, prm, nullptr, nullptr, nullptr), Catch::Contains("null"));
  cfg.truncation = -1;
  CHECK_THROWS_WITH(cuda::ema_forward(cfg, prm, nullptr, nullptr, nullptr), Catch::Contains("truncation"));
}
