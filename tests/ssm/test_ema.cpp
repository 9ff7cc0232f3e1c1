// Tests of the multi-head damped EMA: ops/ema.hpp and layers/ema.hpp (docs/maths/ema.md).
#include <catch2/catch.hpp>

#include <sma/io/safetensors.hpp>
#include <sma/layers/ema.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

using namespace sma;

namespace {

constexpr EmaAlgo kAlgos[] = {EmaAlgo::fft, EmaAlgo::scan, EmaAlgo::direct, EmaAlgo::automatic};

template <class T>
std::map<std::string, Param<T>*> params_of(MultiHeadEma<T>& layer) {
  std::map<std::string, Param<T>*> m;
  for_each_param(layer, [&](const std::string& name, Param<T>& p) { m[name] = &p; });
  return m;
}

/// max |a - b| / max |b| over all elements (b must not be all zero).
template <class A, class B>
double rel_err(const A* a, const B* b, Index n) {
  double num = 0, den = 0;
  for (Index i = 0; i < n; ++i) {
    num = std::max(num, std::abs(double(a[i]) - double(b[i])));
    den = std::max(den, std::abs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

/// The output written straight from the formulas: kernel by exp(t log q), then the O(L^2) double sum.
template <class T>
Tensor3<double> naive_forward(MultiHeadEma<T>& layer, const Tensor3<T>& x, const Mask* pad) {
  const auto& cfg = layer.config();
  auto p = params_of(layer);
  const Index B = x.dimension(0), L = x.dimension(1), D = cfg.dim, N = cfg.ndim;
  const Index K = cfg.truncation > 0 ? std::min(L, cfg.truncation) : L;
  const Index R = layer.kernel_rows();
  std::vector<double> k(static_cast<std::size_t>(R * K), 0.0);
  for (Index r = 0; r < R; ++r)
    for (Index n = 0; n < N; ++n) {
      const Index i = r * N + n;
      const double pp = 1 / (1 + std::exp(-double(p["delta"]->data()[i])));
      const double aa = 1 / (1 + std::exp(-double(p["alpha"]->data()[i])));
      const double q = 1 - pp * aa;
      for (Index t = 0; t < K; ++t)
        k[r * K + t] += pp * double(p["beta"]->data()[i]) * std::exp(double(t) * std::log(q)) *
                        double(p["gamma"]->data()[i]) / std::sqrt(double(N));
    }
  auto xm = [&](Index b, Index t, Index d) { return is_padding(pad, b, t) ? 0.0 : double(x(b, t, d)); };
  Tensor3<double> y(B, L, D);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t)
      for (Index d = 0; d < D; ++d) {
        double acc = double(p["omega"]->data()[d]) * double(x(b, t, d));
        for (Index j = 0; j < K && j <= t; ++j) acc += k[d * K + j] * xm(b, t - j, d);
        if (cfg.direction == Direction::bidirectional)
          for (Index j = 0; j < K && t + j < L; ++j) acc += k[(D + d) * K + j] * xm(b, t + j, d);
        y(b, t, d) = acc;
      }
  return y;
}

MultiHeadEma<double>::Config make_cfg(Index D, Index N, Direction dir, Index trunc, EmaAlgo algo) {
  MultiHeadEma<double>::Config c;
  c.dim = D;
  c.ndim = N;
  c.direction = dir;
  c.truncation = trunc;
  c.algo = algo;
  return c;
}

/// Runs forward + backward of `layer` with upstream gradient g; returns dx and every parameter gradient.
template <class T>
std::map<std::string, std::vector<double>> grads_of(MultiHeadEma<T>& layer, const Tensor3<T>& x, const Tensor3<T>& g,
                                                    const Mask* pad, int threads = 0) {
  Context ctx;
  ctx.padding = pad;
  ctx.threads = threads;
  typename MultiHeadEma<T>::Cache cache;
  zero_grad(layer);
  const Tensor3<T> y = layer.forward(ctx, x, cache);
  const Tensor3<T> dx = layer.backward(ctx, g, cache);
  std::map<std::string, std::vector<double>> out;
  out["y"].assign(y.data(), y.data() + y.size());
  out["dx"].assign(dx.data(), dx.data() + dx.size());
  for_each_param(layer,
                 [&](const std::string& name, Param<T>& p) { out["d" + name].assign(p.grad(), p.grad() + p.size()); });
  return out;
}

}  // namespace

TEST_CASE("EMA forward matches the O(L^2) loops of the formulas", "[ema][forward]") {
  const Index B = 2, L = 23, D = 5, N = 3;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 11);
  const Mask pad = testing::padding_from_lengths({23, 15}, L);
  for (Direction dir : {Direction::causal, Direction::bidirectional})
    for (Index trunc : {Index(0), Index(5), Index(23), Index(40)})
      for (const Mask* mask : {static_cast<const Mask*>(nullptr), &pad}) {
        MultiHeadEma<double> layer(make_cfg(D, N, dir, trunc, EmaAlgo::automatic), /*seed=*/3);
        const Tensor3<double> want = naive_forward(layer, x, mask);
        for (EmaAlgo algo : kAlgos) {
          layer.set_algo(algo);
          Context ctx;
          ctx.padding = mask;
          MultiHeadEma<double>::Cache cache;
          const Tensor3<double> y = layer.forward(ctx, x, cache);
          INFO(to_string(dir) << " trunc " << trunc << " pad " << (mask != nullptr) << " algo " << to_string(algo));
          REQUIRE(y.dimension(0) == B);
          REQUIRE(y.dimension(1) == L);
          REQUIRE(y.dimension(2) == D);
          CHECK(rel_err(y.data(), want.data(), y.size()) < 1e-12);
        }
      }
}

TEST_CASE("EMA outputs at real tokens do not depend on padded inputs", "[ema][padding]") {
  const Index B = 2, L = 17, D = 4;
  Tensor3<double> x = testing::random_tensor<double>(B, L, D, 5);
  const Mask pad = testing::padding_from_lengths({10, 17}, L);
  for (Direction dir : {Direction::causal, Direction::bidirectional}) {
    MultiHeadEma<double> layer(make_cfg(D, 2, dir, 0, EmaAlgo::automatic), 9);
    Context ctx;
    ctx.padding = &pad;
    MultiHeadEma<double>::Cache c1, c2;
    const Tensor3<double> y1 = layer.forward(ctx, x, c1);
    Tensor3<double> x2 = x;
    for (Index t = 10; t < L; ++t)
      for (Index d = 0; d < D; ++d) x2(0, t, d) += 100.0;
    const Tensor3<double> y2 = layer.forward(ctx, x2, c2);
    for (Index t = 0; t < 10; ++t)
      for (Index d = 0; d < D; ++d) CHECK(y1(0, t, d) == Approx(y2(0, t, d)).epsilon(1e-12));
  }
}

TEST_CASE("EMA algorithms agree: forward, dx and every parameter gradient (double)", "[ema][algos]") {
  const Index B = 3, L = 41, D = 6, N = 4;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 21);
  const Tensor3<double> g = testing::random_tensor<double>(B, L, D, 22);
  const Mask pad = testing::padding_from_lengths({41, 30, 7}, L);
  for (Direction dir : {Direction::causal, Direction::bidirectional})
    for (Index trunc : {Index(0), Index(9)})
      for (const Mask* mask : {static_cast<const Mask*>(nullptr), &pad}) {
        MultiHeadEma<double> layer(make_cfg(D, N, dir, trunc, EmaAlgo::direct), 4);
        const auto ref = grads_of(layer, x, g, mask);
        for (EmaAlgo algo : {EmaAlgo::fft, EmaAlgo::scan}) {
          layer.set_algo(algo);
          const auto got = grads_of(layer, x, g, mask);
          for (const auto& kv : ref) {
            INFO(to_string(dir) << " trunc " << trunc << " pad " << (mask != nullptr) << " algo " << to_string(algo)
                                << " tensor " << kv.first);
            const auto& w = kv.second;
            CHECK(rel_err(got.at(kv.first).data(), w.data(), Index(w.size())) < 1e-12);
          }
        }
      }
}

TEST_CASE("EMA algorithms agree in float to 1e-5 of the double result", "[ema][algos][float]") {
  const Index B = 2, L = 64, D = 8, N = 3;
  const Tensor3<double> xd = testing::random_tensor<double>(B, L, D, 31);
  const Tensor3<double> gd = testing::random_tensor<double>(B, L, D, 32);
  const Tensor3<float> xf = xd.cast<float>();
  const Tensor3<float> gf = gd.cast<float>();
  for (Direction dir : {Direction::causal, Direction::bidirectional})
    for (Index trunc : {Index(0), Index(20)}) {
      MultiHeadEma<double> ld(make_cfg(D, N, dir, trunc, EmaAlgo::direct), 8);
      MultiHeadEma<float>::Config cf;
      cf.dim = D;
      cf.ndim = N;
      cf.direction = dir;
      cf.truncation = trunc;
      MultiHeadEma<float> lf(cf, 0);
      auto pd = params_of(ld);
      auto pf = params_of(lf);
      for (auto& kv : pd)
        for (Index i = 0; i < kv.second->size(); ++i) pf[kv.first]->data()[i] = float(kv.second->data()[i]);
      const auto ref = grads_of(ld, xd, gd, nullptr);
      for (EmaAlgo algo : kAlgos) {
        lf.set_algo(algo);
        const auto got = grads_of(lf, xf, gf, nullptr);
        for (const auto& kv : ref) {
          INFO(to_string(dir) << " trunc " << trunc << " algo " << to_string(algo) << " tensor " << kv.first);
          CHECK(rel_err(got.at(kv.first).data(), kv.second.data(), Index(kv.second.size())) < 1e-5);
        }
      }
    }
}

TEST_CASE("EMA gradients match finite differences for every algorithm", "[ema][grad]") {
  const Index B = 2, L = 9, D = 3, N = 2;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 41);
  const Mask pad = testing::padding_from_lengths({9, 5}, L);
  for (Direction dir : {Direction::causal, Direction::bidirectional})
    for (Index trunc : {Index(0), Index(4)})
      for (const Mask* mask : {static_cast<const Mask*>(nullptr), &pad})
        for (EmaAlgo algo : kAlgos) {
          MultiHeadEma<double> layer(make_cfg(D, N, dir, trunc, algo), 12);
          testing::GradcheckOptions opt;
          opt.padding = mask;
          const auto r = testing::gradcheck(layer, x, opt);
          INFO(to_string(dir) << " trunc " << trunc << " pad " << (mask != nullptr) << " algo " << to_string(algo));
          INFO(r);
          CHECK(r.ok);
        }
}

TEST_CASE("EMA with several threads equals one thread", "[ema][threads]") {
  const Index B = 2, L = 300, D = 40, N = 4;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 51);
  const Tensor3<double> g = testing::random_tensor<double>(B, L, D, 52);
  for (Direction dir : {Direction::causal, Direction::bidirectional})
    for (EmaAlgo algo : {EmaAlgo::fft, EmaAlgo::scan, EmaAlgo::direct}) {
      MultiHeadEma<double> layer(make_cfg(D, N, dir, 100, algo), 6);
      const auto one = grads_of(layer, x, g, nullptr, 1);
      const auto two = grads_of(layer, x, g, nullptr, 2);
      for (const auto& kv : one) {
        INFO(to_string(dir) << " algo " << to_string(algo) << " tensor " << kv.first);
        CHECK(rel_err(two.at(kv.first).data(), kv.second.data(), Index(kv.second.size())) < 1e-13);
      }
    }
}

TEST_CASE("EMA parameter changes between calls are seen (no stale kernel)", "[ema][forward]") {
  const Tensor3<double> x = testing::random_tensor<double>(1, 12, 3, 61);
  for (EmaAlgo algo : kAlgos) {
    MultiHeadEma<double> layer(make_cfg(3, 2, Direction::causal, 0, algo), 1);
    Context ctx;
    MultiHeadEma<double>::Cache cache;
    (void)layer.forward(ctx, x, cache);
    params_of(layer)["delta"]->data()[0] += 0.5;
    params_of(layer)["gamma"]->data()[3] -= 0.25;
    const Tensor3<double> y = layer.forward(ctx, x, cache);
    const Tensor3<double> want = naive_forward(layer, x, nullptr);
    CHECK(rel_err(y.data(), want.data(), y.size()) < 1e-12);
  }
}

TEST_CASE("EMA kernel, FFT sizes, L = 1 and the cost model", "[ema][ops]") {
  MultiHeadEma<double> layer(make_cfg(4, 3, Direction::bidirectional, 6, EmaAlgo::automatic), 2);
  const Tensor2<double> k = layer.kernel(10);
  REQUIRE(k.dimension(0) == 8);
  REQUIRE(k.dimension(1) == 6);
  // kernel[r, t] from the formula
  auto p = params_of(layer);
  for (Index r = 0; r < 8; ++r)
    for (Index t = 0; t < 6; ++t) {
      double want = 0;
      for (Index n = 0; n < 3; ++n) {
        const Index i = r * 3 + n;
        const double pp = 1 / (1 + std::exp(-p["delta"]->data()[i]));
        const double q = 1 - pp / (1 + std::exp(-p["alpha"]->data()[i]));
        want += pp * p["beta"]->data()[i] * std::pow(q, double(t)) * p["gamma"]->data()[i] / std::sqrt(3.0);
      }
      CHECK(k(r, t) == Approx(want).epsilon(1e-13));
    }
  CHECK(layer.kernel(3).dimension(1) == 3);

  for (Index L = 1; L < 400; L += 7)
    for (Index trunc : {Index(0), Index(3), Index(50)}) {
      ops::EmaShape s;
      s.batch = 1;
      s.length = L;
      s.dim = 1;
      s.order = 1;
      s.truncation = trunc;
      const Index n = ops::ema_fft_size(s);
      CHECK(n >= L + s.kernel_size() - 1);
      CHECK(n % 4 == 0);
      Index r = n;
      for (Index f : {2, 3, 5})
        while (r % f == 0) r /= f;
      CHECK(r == 1);
    }

  // L = 1 and B = 0 work for every algorithm.
  for (EmaAlgo algo : kAlgos) {
    layer.set_algo(algo);
    const Tensor3<double> x1 = testing::random_tensor<double>(2, 1, 4, 3);
    Context ctx;
    MultiHeadEma<double>::Cache cache;
    const Tensor3<double> y = layer.forward(ctx, x1, cache);
    const Tensor3<double> want = naive_forward(layer, x1, nullptr);
    CHECK(rel_err(y.data(), want.data(), y.size()) < 1e-12);
    const Tensor3<double> x0(0, 5, 4);
    const Tensor3<double> y0 = layer.forward(ctx, x0, cache);
    CHECK(y0.size() == 0);
    CHECK(layer.backward(ctx, y0, cache).size() == 0);
  }

  // Cost model: short kernels go direct, long sequences with few orders scan, many orders with long kernels FFT.
  ops::EmaShape s;
  s.batch = 4;
  s.dim = 64;
  s.length = 1024;
  s.order = 2;
  s.truncation = 4;
  CHECK(ops::ema_choose_algo(s, false) == EmaAlgo::direct);
  s.truncation = 0;
  CHECK(ops::ema_choose_algo(s, false) == EmaAlgo::scan);
  // The vectorised scan beats kissfft even at N = 512 for a few rows; the FFT pays off with many rows (the kernel
  // and its transform are shared by the batch, the scan's work is not).
  s.order = 512;
  s.batch = 64;
  CHECK(ops::ema_choose_algo(s, false) == EmaAlgo::fft);
  CHECK(ops::ema_choose_algo(s, true) == EmaAlgo::fft);
}

TEST_CASE("EMA streaming equals the full forward at every position", "[ema][stream]") {
  const Index B = 2, L = 30, D = 5, N = 3;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 71);
  for (Index trunc : {Index(0), Index(7)}) {
    MultiHeadEma<double> layer(make_cfg(D, N, Direction::causal, trunc, EmaAlgo::automatic), 13);
    Context ctx;
    MultiHeadEma<double>::Cache cache;
    const Tensor3<double> full = layer.forward(ctx, x, cache);
    auto st = layer.make_state(B);
    Tensor3<double> tok(B, L, D);
    for (Index t = 0; t < L; ++t) {
      Tensor2<double> xt(B, D);
      for (Index b = 0; b < B; ++b)
        for (Index d = 0; d < D; ++d) xt(b, d) = x(b, t, d);
      const Tensor2<double> yt = layer.step(xt, st);
      for (Index b = 0; b < B; ++b)
        for (Index d = 0; d < D; ++d) tok(b, t, d) = yt(b, d);
    }
    CHECK(st.position == L);
    INFO("trunc " << trunc);
    CHECK(rel_err(tok.data(), full.data(), full.size()) < 1e-12);

    // Chunks of uneven sizes give the same as token by token.
    auto st2 = layer.make_state(B);
    Tensor3<double> chunked(B, L, D);
    Index t0 = 0;
    for (Index c : {Index(1), Index(4), Index(9), Index(3), Index(13)}) {
      Tensor3<double> xc(B, c, D);
      for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < c; ++t)
          for (Index d = 0; d < D; ++d) xc(b, t, d) = x(b, t0 + t, d);
      const Tensor3<double> yc = layer.step_chunk(xc, st2);
      REQUIRE(yc.dimension(1) == c);
      for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < c; ++t)
          for (Index d = 0; d < D; ++d) chunked(b, t0 + t, d) = yc(b, t, d);
      t0 += c;
    }
    REQUIRE(t0 == L);
    CHECK(rel_err(chunked.data(), tok.data(), tok.size()) == 0.0);
  }
}

TEST_CASE("EMA rejects bad shapes and values with named errors", "[ema][errors]") {
  CHECK_THROWS_AS(MultiHeadEma<double>(make_cfg(4, 0, Direction::causal, 0, EmaAlgo::automatic)), ValueError);
  CHECK_THROWS_AS(MultiHeadEma<double>(make_cfg(0, 2, Direction::causal, 0, EmaAlgo::automatic)), ValueError);
  CHECK_THROWS_AS(MultiHeadEma<double>(make_cfg(4, 2, Direction::causal, -1, EmaAlgo::automatic)), ValueError);
  CHECK_THROWS_WITH(MultiHeadEma<double>(make_cfg(4, 0, Direction::causal, 0, EmaAlgo::automatic)),
                    Catch::Matchers::Contains("ndim must be >= 1, got 0"));

  MultiHeadEma<double> layer(make_cfg(4, 2, Direction::causal, 0, EmaAlgo::automatic));
  Context ctx;
  MultiHeadEma<double>::Cache cache;
  const Tensor3<double> bad = testing::random_tensor<double>(2, 5, 3, 1);
  CHECK_THROWS_AS(layer.forward(ctx, bad, cache), ShapeError);
  CHECK_THROWS_WITH(layer.forward(ctx, bad, cache), Catch::Matchers::Contains("got (2, 5, 3)"));

  const Tensor3<double> x = testing::random_tensor<double>(2, 5, 4, 1);
  const Mask wrong = testing::padding_from_lengths({5, 5, 5}, 5);
  ctx.padding = &wrong;
  CHECK_THROWS_AS(layer.forward(ctx, x, cache), ShapeError);
  ctx.padding = nullptr;

  (void)layer.forward(ctx, x, cache);
  const Tensor3<double> bad_dy = testing::random_tensor<double>(2, 6, 4, 1);
  CHECK_THROWS_AS(layer.backward(ctx, bad_dy, cache), ShapeError);

  Context finite;
  finite.check_finite = true;
  Tensor3<double> nan_x = x;
  nan_x(1, 2, 3) = std::nan("");
  CHECK_THROWS_AS(layer.forward(finite, nan_x, cache), NumericError);

  auto st = layer.make_state(2);
  CHECK_THROWS_AS(layer.step(Tensor2<double>(2, 3), st), ShapeError);
  CHECK_THROWS_AS(layer.step(Tensor2<double>(3, 4), st), ShapeError);
  CHECK_THROWS_AS(layer.make_state(-1), ValueError);

  MultiHeadEma<double> bidir(make_cfg(4, 2, Direction::bidirectional, 0, EmaAlgo::automatic));
  CHECK_THROWS_AS(bidir.make_state(2), ValueError);
  CHECK_THROWS_AS(bidir.step(Tensor2<double>(2, 4), st), ValueError);
  CHECK_THROWS_AS(layer.set_truncation(-3), ValueError);
  MultiHeadEma<double> trunc_layer(make_cfg(4, 2, Direction::causal, 3, EmaAlgo::automatic));
  auto st3 = trunc_layer.make_state(2);
  trunc_layer.set_truncation(5);
  CHECK_THROWS_AS(trunc_layer.step(Tensor2<double>(2, 4), st3), ValueError);

  // Shapes of the parameters are PyTorch's.
  MultiHeadEma<float>::Config cf;
  cf.dim = 4;
  cf.ndim = 3;
  cf.direction = Direction::bidirectional;
  MultiHeadEma<float> lf(cf, 0);
  std::map<std::string, std::vector<Index>> shapes;
  for_each_param(lf, [&](const std::string& name, Param<float>& p) { shapes[name] = p.shape(); });
  CHECK(shapes["delta"] == std::vector<Index>{8, 3, 1});
  CHECK(shapes["alpha"] == std::vector<Index>{8, 3, 1});
  CHECK(shapes["beta"] == std::vector<Index>{8, 3, 1});
  CHECK(shapes["gamma"] == std::vector<Index>{8, 3});
  CHECK(shapes["omega"] == std::vector<Index>{4});
  MultiHeadEma<float> placeholder;
  MultiHeadEma<float>::Cache placeholder_cache;
  CHECK_THROWS_AS(placeholder.forward(ctx, Tensor3<float>(1, 2, 3), placeholder_cache), ValueError);
  placeholder = lf;
  CHECK(placeholder.config().dim == 4);
  static_assert(check_layer<MultiHeadEma<float>>());
  static_assert(check_layer<MultiHeadEma<double>>());
}

TEST_CASE("EMA initialisation follows reset_parameters_trunc", "[ema][init]") {
  MultiHeadEma<double> a(make_cfg(64, 4, Direction::bidirectional, 0, EmaAlgo::automatic), 77);
  MultiHeadEma<double> b(make_cfg(64, 4, Direction::bidirectional, 0, EmaAlgo::automatic), 77);
  auto pa = params_of(a);
  auto pb = params_of(b);
  for (auto& kv : pa)
    for (Index i = 0; i < kv.second->size(); ++i) REQUIRE(kv.second->data()[i] == pb[kv.first]->data()[i]);
  auto stats = [](const Param<double>& p, double& mean, double& sd, double& maxabs) {
    mean = 0;
    for (Index i = 0; i < p.size(); ++i) mean += p.data()[i];
    mean /= double(p.size());
    sd = 0;
    maxabs = 0;
    for (Index i = 0; i < p.size(); ++i) {
      sd += (p.data()[i] - mean) * (p.data()[i] - mean);
      maxabs = std::max(maxabs, std::abs(p.data()[i] - mean));
    }
    sd = std::sqrt(sd / double(p.size()));
  };
  double m, s, mx;
  stats(*pa["delta"], m, s, mx);
  CHECK(std::abs(m) < 0.05);
  CHECK(s == Approx(0.2 * 0.88).epsilon(0.15));  // a normal truncated at 2 std has std 0.88 std
  CHECK(mx <= 0.4 + 0.05);
  stats(*pa["gamma"], m, s, mx);
  CHECK(s == Approx(0.88).epsilon(0.15));
  CHECK(mx <= 2.0 + 0.1);
  for (Index r = 0; r < 128; ++r)
    for (Index n = 0; n < 4; ++n) {
      const double v = pa["beta"]->data()[r * 4 + n];
      CHECK(std::abs(v - (n % 2 == 0 ? 1.0 : -1.0)) <= 0.04 + 1e-12);
    }
}

// ---- golden parity with the official PyTorch MultiHeadEMA (files read with io::SafetensorsFile) ----

namespace {

std::string golden_dir() {
  if (const char* env = std::getenv("SMA_GOLDEN_DIR")) return env;
  return SMA_GOLDEN_DIR_DEFAULT;
}

/// [T, B, C] time-major -> (B, T, C).
Tensor3<double> from_time_major(const io::SafetensorsFile& f, const std::string& name) {
  const auto v = f.values<double>(name);
  const auto& shape = f.info(name).shape;
  REQUIRE(shape.size() == 3);
  const Index T = shape[0], B = shape[1], C = shape[2];
  Tensor3<double> out(B, T, C);
  for (Index s = 0; s < T; ++s)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) out(b, s, c) = v[static_cast<std::size_t>((s * B + b) * C + c)];
  return out;
}

/// (B, T, C) -> [T, B, C] flat.
std::vector<double> to_time_major(const Tensor3<double>& x) {
  const Index B = x.dimension(0), T = x.dimension(1), C = x.dimension(2);
  std::vector<double> v(static_cast<std::size_t>(x.size()));
  for (Index s = 0; s < T; ++s)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) v[static_cast<std::size_t>((s * B + b) * C + c)] = x(b, s, c);
  return v;
}

}  // namespace

TEST_CASE("EMA matches the official MultiHeadEMA on the golden cases", "[ema][golden]") {
  const std::string dir = golden_dir();
  if (!std::ifstream(dir + "/ema_causal.safetensors").good()) {
    WARN("golden folder " << dir << " not found (set SMA_GOLDEN_DIR); golden EMA parity not checked");
    return;
  }
  for (const char* name : {"ema_bidir", "ema_causal", "ema_bidir_trunc_pad", "ema_causal_trunc_pad"}) {
    const io::SafetensorsFile g(dir + "/" + name + ".safetensors");
    const auto cfg_json = nlohmann::json::parse(g.metadata_value("config"));
    MultiHeadEma<double>::Config cfg;
    cfg.dim = cfg_json.at("embed_dim").get<Index>();
    cfg.ndim = cfg_json.at("ndim").get<Index>();
    cfg.direction = cfg_json.at("bidirectional").get<bool>() ? Direction::bidirectional : Direction::causal;
    cfg.truncation = cfg_json.at("truncation").is_null() ? 0 : cfg_json.at("truncation").get<Index>();

    const Tensor3<double> x = from_time_major(g, "input");
    const Tensor3<double> dy = from_time_major(g, "grad_output");
    const bool padded = g.contains("padding_mask");
    const Mask pad = padded ? g.tensor<std::uint8_t, 2>("padding_mask") : Mask();
    for (EmaAlgo algo : kAlgos) {
      cfg.algo = algo;
      MultiHeadEma<double> layer(cfg, 0);
      for_each_param(layer, [&](const std::string& pname, Param<double>& p) {
        REQUIRE(g.info(pname).shape == p.shape());
        const auto v = g.values<double>(pname);
        std::copy(v.begin(), v.end(), p.data());
      });
      INFO(name << " algo " << to_string(algo));
      const Tensor2<double> k = layer.kernel(x.dimension(1));
      const auto kexp = g.values<double>("inter.kernel");
      REQUIRE(Index(kexp.size()) == k.size());
      CHECK(rel_err(k.data(), kexp.data(), k.size()) < 1e-9);

      Context ctx;
      ctx.padding = padded ? &pad : nullptr;
      MultiHeadEma<double>::Cache cache;
      zero_grad(layer);
      const Tensor3<double> y = layer.forward(ctx, x, cache);
      const auto yexp = g.values<double>("output");
      const auto ytm = to_time_major(y);
      CHECK(rel_err(ytm.data(), yexp.data(), Index(ytm.size())) < 1e-9);

      const Tensor3<double> dx = layer.backward(ctx, dy, cache);
      const auto dxtm = to_time_major(dx);
      const auto dxexp = g.values<double>("grad.input");
      CHECK(rel_err(dxtm.data(), dxexp.data(), Index(dxtm.size())) < 1e-9);
      for_each_param(layer, [&](const std::string& pname, Param<double>& p) {
        const auto want = g.values<double>("grad." + pname);
        INFO("grad." << pname);
        CHECK(rel_err(p.grad(), want.data(), p.size()) < 1e-9);
      });
    }
  }
}
