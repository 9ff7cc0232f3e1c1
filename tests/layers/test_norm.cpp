#include <catch2/catch.hpp>
#include <sma/layers/norm.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <cmath>
#include <map>
#include <string>
#include <vector>

using namespace sma;

namespace {

/// Sets every trainable parameter to 1 + N(0, 0.3) so gains are not trivially 1 (buffers untouched).
template <class Layer>
void perturb(Layer& layer, std::uint64_t seed) {
  testing::randomize_params(layer, seed, 0.3);
  for_each_param(layer, [](const std::string& name, auto& p) {
    if (p.trainable() && name.find("bias") == std::string::npos)
      for (Index i = 0; i < p.size(); ++i) p.data()[i] += 1;
  });
}

template <class Layer>
std::vector<std::string> names_of(Layer& layer) {
  std::vector<std::string> n;
  for_each_param(layer, [&](const std::string& name, auto&) { n.push_back(name); });
  return n;
}

double max_abs_diff(const Tensor3<double>& a, const Tensor3<double>& b) {
  REQUIRE(dims_of(a) == dims_of(b));
  double m = 0;
  for (Index i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i] - b.data()[i]));
  return m;
}

}  // namespace

TEST_CASE("LayerNorm forward equals the definition", "[layers][norm]") {
  const Index B = 2, L = 3, D = 6;
  LayerNorm<double> ln({D});
  perturb(ln, 1);
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 2, 3.0);
  Context ctx;
  LayerNorm<double>::Cache cache;
  const Tensor3<double> y = ln.forward(ctx, x, cache);
  Tensor3<double> want(B, L, D);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t) {
      double mean = 0, var = 0;
      for (Index d = 0; d < D; ++d) mean += x(b, t, d) / D;
      for (Index d = 0; d < D; ++d) var += (x(b, t, d) - mean) * (x(b, t, d) - mean) / D;
      for (Index d = 0; d < D; ++d)
        want(b, t, d) = (x(b, t, d) - mean) / std::sqrt(var + 1e-5) * ln.weight().data()[d] + ln.bias().data()[d];
    }
  CHECK(max_abs_diff(y, want) < 1e-12);
  CHECK(names_of(ln) == std::vector<std::string>{"weight", "bias"});
  LayerNorm<double> plain({D, 1e-5, false});
  CHECK(names_of(plain).empty());
}

TEST_CASE("RMSNorm and ScaleNorm forward equal MEGA's definitions", "[layers][norm]") {
  const Index B = 2, L = 2, D = 5;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 3, 2.0);
  RMSNorm<double> rms({D});
  perturb(rms, 4);
  ScaleNorm<double> sn({D});
  sn.scalar().data()[0] = 1.7;
  Context ctx;
  RMSNorm<double>::Cache c1;
  ScaleNorm<double>::Cache c2;
  const Tensor3<double> y1 = rms.forward(ctx, x, c1);
  const Tensor3<double> y2 = sn.forward(ctx, x, c2);
  Tensor3<double> w1(B, L, D), w2(B, L, D);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t) {
      double ms = 0;
      for (Index d = 0; d < D; ++d) ms += x(b, t, d) * x(b, t, d) / D;
      for (Index d = 0; d < D; ++d) {
        w1(b, t, d) = x(b, t, d) * rms.weight().data()[d] / std::sqrt(ms + 1e-6);
        w2(b, t, d) = 1.7 * x(b, t, d) / std::sqrt(ms + 1e-6);
      }
    }
  CHECK(max_abs_diff(y1, w1) < 1e-12);
  CHECK(max_abs_diff(y2, w2) < 1e-12);
  CHECK(names_of(rms) == std::vector<std::string>{"weight"});
  CHECK(names_of(sn) == std::vector<std::string>{"scalar"});
  CHECK(sn.scalar().shape() == std::vector<Index>{1});
}

TEST_CASE("BatchNorm forward: batch statistics in train mode, running ones in eval", "[layers][norm][batchnorm]") {
  const Index B = 3, L = 4, D = 3;
  BatchNorm<double> bn({D});
  perturb(bn, 5);
  bn.running_mean().data()[1] = 0.3;
  bn.running_var().data()[1] = 2.0;
  const Tensor3<double> x = testing::random_tensor<double>(B, L, D, 6, 2.0);
  const double N = B * L;
  Tensor3<double> want_train(B, L, D), want_eval(B, L, D);
  for (Index d = 0; d < D; ++d) {
    double mean = 0, var = 0;
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) mean += x(b, t, d) / N;
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) var += (x(b, t, d) - mean) * (x(b, t, d) - mean) / N;
    const double w = bn.weight().data()[d], bias = bn.bias().data()[d];
    const double rm = bn.running_mean().data()[d], rv = bn.running_var().data()[d];
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) {
        want_train(b, t, d) = (x(b, t, d) - mean) / std::sqrt(var + 1e-5) * w + bias;
        want_eval(b, t, d) = (x(b, t, d) - rm) / std::sqrt(rv + 1e-5) * w + bias;
      }
  }
  BatchNorm<double>::Cache cache;
  Context eval(Mode::eval);
  CHECK(max_abs_diff(bn.forward(eval, x, cache), want_eval) < 1e-12);
  Context train(Mode::train);
  train.update_statistics = false;
  CHECK(max_abs_diff(bn.forward(train, x, cache), want_train) < 1e-12);
  CHECK(bn.num_batches_tracked() == 0);
  CHECK(names_of(bn) ==
        std::vector<std::string>{"weight", "bias", "running_mean", "running_var", "num_batches_tracked"});
  Index trainable = 0;
  for_each_param(bn, [&](const std::string&, Param<double>& p) { trainable += p.trainable(); });
  CHECK(trainable == 2);
  BatchNorm<double> plain({D, 1e-5, false});
  CHECK(names_of(plain) == std::vector<std::string>{"running_mean", "running_var", "num_batches_tracked"});
}

TEST_CASE("BatchNorm running statistics: momentum 0.1, unbiased variance, counted batches",
          "[layers][norm][batchnorm]") {
  // One batch row, four positions, two channels: channel 0 holds 1, 2, 3, 4 and channel 1 holds 0, 0, 0, 8.
  Tensor3<double> x(1, 4, 2);
  const double c0[] = {1, 2, 3, 4}, c1[] = {0, 0, 0, 8};
  for (Index t = 0; t < 4; ++t) {
    x(0, t, 0) = c0[t];
    x(0, t, 1) = c1[t];
  }
  BatchNorm<double> bn({2});
  BatchNorm<double>::Cache cache;
  Context train(Mode::train);
  (void)bn.forward(train, x, cache);
  // mean (2.5, 2); unbiased var (5/3, 16); running = 0.9 * (0, 1) + 0.1 * batch.
  CHECK(bn.running_mean().data()[0] == Approx(0.25));
  CHECK(bn.running_mean().data()[1] == Approx(0.2));
  CHECK(bn.running_var().data()[0] == Approx(0.9 + 0.1 * 5.0 / 3.0));
  CHECK(bn.running_var().data()[1] == Approx(0.9 + 0.1 * 16.0));
  CHECK(bn.num_batches_tracked() == 1);
  (void)bn.forward(train, x, cache);
  CHECK(bn.running_mean().data()[0] == Approx(0.9 * 0.25 + 0.25));
  CHECK(bn.running_var().data()[1] == Approx(0.9 * 2.5 + 1.6));
  CHECK(bn.num_batches_tracked() == 2);
  // Normalisation itself used the biased variance: channel 1 -> (x - 2) / sqrt(12 + eps).
  const Tensor3<double> y = bn.forward(train, x, cache);
  CHECK(y(0, 3, 1) == Approx(6.0 / std::sqrt(12.0 + 1e-5)));
  // No update in eval mode, nor with update_statistics off.
  const double rm = bn.running_mean().data()[0];
  Context eval(Mode::eval);
  (void)bn.forward(eval, x, cache);
  Context frozen(Mode::train);
  frozen.update_statistics = false;
  (void)bn.forward(frozen, x, cache);
  CHECK(bn.running_mean().data()[0] == rm);
  CHECK(bn.num_batches_tracked() == 3);
  // The padding mask does not change the statistics (the reference ignores it too).
  Mask pad = testing::padding_from_lengths({2}, 4);
  BatchNorm<double> a({2}), b({2});
  Context with_pad(Mode::train);
  with_pad.padding = &pad;
  const Tensor3<double> ya = a.forward(with_pad, x, cache);
  const Tensor3<double> yb = b.forward(train, x, cache);
  CHECK(max_abs_diff(ya, yb) == 0);
  CHECK(a.running_mean().data()[0] == b.running_mean().data()[0]);
  bn.reset_running_stats();
  CHECK(bn.num_batches_tracked() == 0);
  CHECK(bn.running_var().data()[0] == 1.0);
  // A single value per channel cannot be normalised in train mode.
  Tensor3<double> one(1, 1, 2);
  one.setZero();
  CHECK_THROWS_AS(bn.forward(train, one, cache), ValueError);
  CHECK_NOTHROW(bn.forward(eval, one, cache));
}

TEST_CASE("Norm layers pass gradcheck", "[layers][norm][grad]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 5, 4, 10, 1.5);
  for (bool affine : {true, false}) {
    INFO("affine " << affine);
    LayerNorm<double> ln({4, 1e-5, affine});
    perturb(ln, 1);
    auto r = testing::gradcheck(ln, x);
    INFO(r);
    CHECK(r.ok);
    RMSNorm<double> rms({4, 1e-6, affine});
    perturb(rms, 2);
    r = testing::gradcheck(rms, x);
    INFO(r);
    CHECK(r.ok);
    ScaleNorm<double> sn({4, 1e-6, affine});
    perturb(sn, 3);
    r = testing::gradcheck(sn, x);
    INFO(r);
    CHECK(r.ok);
    for (Mode m : {Mode::train, Mode::eval}) {
      INFO("batchnorm mode " << to_string(m));
      BatchNorm<double> bn({4, 1e-5, affine});
      perturb(bn, 4);
      bn.running_mean().data()[2] = 0.5;
      bn.running_var().data()[2] = 0.7;
      testing::GradcheckOptions opt;
      opt.mode = m;
      r = testing::gradcheck(bn, x, opt);
      INFO(r);
      CHECK(r.ok);
      CHECK(bn.num_batches_tracked() == 0);  // gradcheck turns update_statistics off
    }
  }
  LayerNorm<double, 4> fixed({4});
  const auto r = testing::gradcheck(fixed, x);
  INFO(r);
  CHECK(r.ok);
}

TEST_CASE("Norms work in float and match double", "[layers][norm]") {
  const Tensor3<double> xd = testing::random_tensor<double>(3, 7, 16, 12, 2.0);
  const Tensor3<float> xf = xd.cast<float>();
  for (NormType t : {NormType::layernorm, NormType::batchnorm, NormType::scalenorm, NormType::rmsnorm}) {
    INFO(to_string(t));
    SequenceNorm<double> nd({t, 16});
    SequenceNorm<float> nf({t, 16});
    Context ctx(Mode::train);
    SequenceNorm<double>::Cache cd;
    SequenceNorm<float>::Cache cf;
    const Tensor3<double> yd = nd.forward(ctx, xd, cd);
    const Tensor3<float> yf = nf.forward(ctx, xf, cf);
    const Tensor3<double> g = testing::random_tensor<double>(3, 7, 16, 13);
    const Tensor3<float> gf = g.cast<float>();
    const Tensor3<double> dd = nd.backward(ctx, g, cd);
    const Tensor3<float> df = nf.backward(ctx, gf, cf);
    for (Index i = 0; i < yd.size(); ++i) {
      CHECK(double(yf.data()[i]) == Approx(yd.data()[i]).margin(1e-5));
      CHECK(double(df.data()[i]) == Approx(dd.data()[i]).margin(1e-4));
    }
  }
}

TEST_CASE("SequenceNorm wraps the chosen norm under 'norm.' like fairseq", "[layers][norm]") {
  CHECK(parse_norm_type("layernorm") == NormType::layernorm);
  CHECK(parse_norm_type("batchnorm") == NormType::batchnorm);
  CHECK(parse_norm_type("scalenorm") == NormType::scalenorm);
  CHECK(parse_norm_type("rmsnorm") == NormType::rmsnorm);
  CHECK_THROWS_WITH(parse_norm_type("groupnorm"), Catch::Matchers::Contains("'groupnorm'"));

  SequenceNorm<double> bn({NormType::batchnorm, 8});
  CHECK(names_of(bn) == std::vector<std::string>{"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                                                 "norm.num_batches_tracked"});
  // A layer that holds it as "norm." gives the official state_dict names.
  std::vector<std::string> outer;
  for_each_param(bn, [&](const std::string&, Param<double>&) {});
  auto collect = [&](const std::string& name, Param<double>&) { outer.push_back(name); };
  visit_child(collect, "norm.", bn);
  CHECK(outer.front() == "norm.norm.weight");
  CHECK(outer.back() == "norm.norm.num_batches_tracked");
  SequenceNorm<double> ln({NormType::layernorm, 8});
  CHECK(names_of(ln) == std::vector<std::string>{"norm.weight", "norm.bias"});
  SequenceNorm<double> sn({NormType::scalenorm, 8});
  CHECK(names_of(sn) == std::vector<std::string>{"norm.scalar"});
  SequenceNorm<double> rn({NormType::rmsnorm, 8, 1e-5, false});
  CHECK(names_of(rn).empty());

  // Delegation: same numbers as the wrapped norm, and eps reaches it.
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 8, 1);
  SequenceNorm<double> wrapped({NormType::rmsnorm, 8, 1e-2});
  RMSNorm<double> direct({8, 1e-2});
  Context ctx;
  SequenceNorm<double>::Cache c1;
  RMSNorm<double>::Cache c2;
  CHECK(max_abs_diff(wrapped.forward(ctx, x, c1), direct.forward(ctx, x, c2)) == 0);

  for (NormType t : {NormType::layernorm, NormType::batchnorm, NormType::scalenorm, NormType::rmsnorm}) {
    SequenceNorm<double> n({t, 8});
    perturb(n, 7);
    testing::GradcheckOptions opt;
    opt.mode = Mode::train;
    const auto r = testing::gradcheck(n, x, opt);
    INFO(to_string(t) << ": " << r);
    CHECK(r.ok);
  }
  // A cache filled by another type of norm is refused.
  SequenceNorm<double>::Cache foreign;
  (void)ln.forward(ctx, x, foreign);
  CHECK_THROWS_AS(bn.backward(ctx, x, foreign), ValueError);
}

TEST_CASE("Norm errors", "[layers][norm][errors]") {
  Context ctx;
  Tensor3<double> x(2, 3, 5);
  x.setZero();
  LayerNorm<double> ln({4});
  LayerNorm<double>::Cache c;
  CHECK_THROWS_WITH(ln.forward(ctx, x, c), Catch::Matchers::Contains("(*, *, 4)") &&
                                                Catch::Matchers::Contains("(2, 3, 5)"));
  BatchNorm<double> bn({4});
  BatchNorm<double>::Cache cb;
  CHECK_THROWS_AS(bn.forward(ctx, x, cb), ShapeError);
  CHECK_THROWS_AS(LayerNorm<double>(LayerNorm<double>::Config{}), ValueError);  // no width
  CHECK_THROWS_AS((LayerNorm<double, 4>({5})), ShapeError);
  CHECK_THROWS_AS(BatchNorm<double>({4, 1e-5, true, 1.5}), ValueError);
  LayerNorm<double> empty;  // default-constructed: width 0
  Tensor3<double> x0(1, 1, 0);
  CHECK_THROWS_AS(empty.forward(ctx, x0, c), ValueError);
}
