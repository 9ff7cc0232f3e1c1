#include <catch2/catch.hpp>
#include <sma/layers/ffn.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <cmath>
#include <string>
#include <vector>

using namespace sma;

namespace {

/// NormalizedFeedForwardNetwork with a LayerNorm, written from the fairseq forward with plain loops.
Tensor3<double> naive_ffn(const Tensor3<double>& x, Ffn<double>& f) {
  const auto& cfg = f.config();
  const Index B = x.dimension(0), L = x.dimension(1), D = cfg.dim, H = cfg.hidden;
  std::vector<double> nw(D, 1.0), nb(D, 0.0);
  for_each_param(f.norm(), [&](const std::string& name, Param<double>& p) {
    for (Index d = 0; d < D; ++d) (name == "norm.weight" ? nw : nb)[d] = p.data()[d];
  });
  auto layer_norm = [&](std::vector<double> v) {
    double mean = 0, var = 0;
    for (double a : v) mean += a / D;
    for (double a : v) var += (a - mean) * (a - mean) / D;
    for (Index d = 0; d < D; ++d) v[d] = (v[d] - mean) / std::sqrt(var + 1e-5) * nw[d] + nb[d];
    return v;
  };
  const Param<double>& w1 = f.fc1().weight();
  const Param<double>& b1 = f.fc1().bias();
  const Param<double>& w2 = f.fc2().weight();
  const Param<double>& b2 = f.fc2().bias();
  Tensor3<double> y(B, L, D);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t) {
      std::vector<double> v(D), res(D);
      for (Index d = 0; d < D; ++d) res[d] = v[d] = x(b, t, d);
      if (cfg.prenorm) v = layer_norm(v);
      std::vector<double> h(H);
      for (Index j = 0; j < H; ++j) {
        double s = b1.data()[j];
        for (Index d = 0; d < D; ++d) s += w1.data()[j * D + d] * v[d];
        h[j] = activate(cfg.activation, s);
      }
      std::vector<double> o(D);
      for (Index d = 0; d < D; ++d) {
        double s = b2.data()[d];
        for (Index j = 0; j < H; ++j) s += w2.data()[d * H + j] * h[j];
        o[d] = s + res[d];
      }
      if (!cfg.prenorm) o = layer_norm(o);
      for (Index d = 0; d < D; ++d) y(b, t, d) = o[d];
    }
  return y;
}

}  // namespace

TEST_CASE("Ffn forward equals the fairseq NormalizedFeedForwardNetwork", "[layers][ffn]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 6, 1);
  for (bool prenorm : {true, false}) {
    for (Activation act : {Activation::silu, Activation::gelu, Activation::relu}) {
      INFO("prenorm " << prenorm << " " << to_string(act));
      Ffn<double>::Config cfg;
      cfg.dim = 6;
      cfg.hidden = 10;
      cfg.activation = act;
      cfg.prenorm = prenorm;
      Ffn<double> f(cfg, 3);
      testing::randomize_params(f, 4);
      Context ctx;
      Ffn<double>::Cache cache;
      const Tensor3<double> y = f.forward(ctx, x, cache);
      const Tensor3<double> want = naive_ffn(x, f);
      double err = 0;
      for (Index i = 0; i < y.size(); ++i) err = std::max(err, std::abs(y.data()[i] - want.data()[i]));
      CHECK(err < 1e-12);
    }
  }
}

TEST_CASE("Ffn parameter names follow the official module", "[layers][ffn]") {
  Ffn<double>::Config cfg;
  cfg.dim = 4;
  cfg.hidden = 8;
  cfg.norm_type = NormType::batchnorm;
  Ffn<double> f(cfg);
  std::vector<std::string> names;
  std::vector<std::vector<Index>> shapes;
  for_each_param(f, [&](const std::string& n, Param<double>& p) {
    names.push_back(n);
    shapes.push_back(p.shape());
  });
  CHECK(names == std::vector<std::string>{"norm.norm.weight", "norm.norm.bias", "norm.norm.running_mean",
                                          "norm.norm.running_var", "norm.norm.num_batches_tracked", "fc1.weight",
                                          "fc1.bias", "fc2.weight", "fc2.bias"});
  CHECK(shapes[5] == std::vector<Index>{8, 4});
  CHECK(shapes[7] == std::vector<Index>{4, 8});
  // Fresh parameters: truncated normal weights, zero biases, identity norm.
  CHECK(f.fc1().weight().vec().cwiseAbs().maxCoeff() <= 0.04);
  CHECK(f.fc1().bias().vec().isZero());
  CHECK(f.fc1().weight().vec() != f.fc2().weight().vec().head(32));
}

TEST_CASE("Ffn gradcheck: pre/post norm, every norm type, dropout, train and eval", "[layers][ffn][grad]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 4, 5, 2);
  for (NormType nt : {NormType::layernorm, NormType::batchnorm, NormType::rmsnorm, NormType::scalenorm}) {
    for (bool prenorm : {true, false}) {
      for (Mode m : {Mode::eval, Mode::train}) {
        Ffn<double>::Config cfg;
        cfg.dim = 5;
        cfg.hidden = 7;
        cfg.prenorm = prenorm;
        cfg.norm_type = nt;
        cfg.activation = prenorm ? Activation::silu : Activation::gelu;
        cfg.dropout = 0.2;
        cfg.hidden_dropout = 0.3;
        Ffn<double> f(cfg, 1);
        testing::randomize_params(f, 5, 0.4);
        testing::GradcheckOptions opt;
        opt.mode = m;
        const auto r = testing::gradcheck(f, x, opt);
        INFO(to_string(nt) << " prenorm " << prenorm << " " << to_string(m) << ": " << r);
        CHECK(r.ok);
      }
    }
  }
}

TEST_CASE("Ffn dropout: train mode drops, eval mode does not, same seed same output", "[layers][ffn]") {
  Ffn<double>::Config cfg;
  cfg.dim = 8;
  cfg.hidden = 16;
  cfg.dropout = 0.5;
  Ffn<double> f(cfg, 2);
  const Tensor3<double> x = testing::random_tensor<double>(4, 16, 8, 3);
  Ffn<double>::Cache cache;
  Context eval(Mode::eval);
  const Tensor3<double> ye = f.forward(eval, x, cache);
  Context t1(Mode::train, 5), t2(Mode::train, 5);
  const Tensor3<double> y1 = f.forward(t1, x, cache);
  const Tensor3<double> y2 = f.forward(t2, x, cache);
  Index dropped = 0, changed = 0;
  for (Index i = 0; i < x.size(); ++i) {
    CHECK(y1.data()[i] == y2.data()[i]);
    dropped += y1.data()[i] == x.data()[i];  // prenorm: a dropped fc2 output leaves the residual alone
    changed += y1.data()[i] != ye.data()[i];
  }
  CHECK(dropped > x.size() / 4);
  CHECK(dropped < 3 * x.size() / 4);
  CHECK(changed > x.size() / 4);
}

TEST_CASE("Ffn errors", "[layers][ffn][errors]") {
  Ffn<double>::Config cfg;
  cfg.dim = 4;
  CHECK_THROWS_AS(Ffn<double>(cfg), ValueError);  // hidden missing
  cfg.hidden = 8;
  cfg.dropout = 2;
  CHECK_THROWS_AS(Ffn<double>(cfg), ValueError);
  cfg.dropout = 0;
  Ffn<double> f(cfg);
  Tensor3<double> x(1, 2, 5);
  x.setZero();
  Context ctx;
  Ffn<double>::Cache cache;
  CHECK_THROWS_WITH(f.forward(ctx, x, cache),
                    Catch::Matchers::Contains("(*, *, 4)") && Catch::Matchers::Contains("(1, 2, 5)"));
  Ffn<double, 8>::Config fixed;
  fixed.dim = 4;
  fixed.hidden = 8;
  CHECK_THROWS_AS((Ffn<double, 8>(fixed)), ShapeError);
}
