#include <catch2/catch.hpp>
#include <sma/compose/repeat.hpp>
#include <sma/compose/residual.hpp>
#include <sma/compose/seq.hpp>
#include <sma/layers/activation.hpp>
#include <sma/layers/dropout.hpp>
#include <sma/layers/ffn.hpp>
#include <sma/layers/linear.hpp>
#include <sma/layers/norm.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

using namespace sma;

namespace {

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

// A named struct keeps error messages and stack traces short (STYLE.md 2.6).
struct Mlp : Seq<Linear<double, 4, 8>, Silu<double, 8>, Linear<double, 8, 4>> {
  using Seq::Seq;
};

Mlp make_mlp(std::uint64_t seed) {
  Mlp m(Linear<double, 4, 8>({4, 8}, seed), Silu<double, 8>(), Linear<double, 8, 4>({8, 4}, seed + 1));
  testing::randomize_params(m, seed + 2, 0.5);
  return m;
}

}  // namespace

static_assert(is_layer_v<Mlp>);
static_assert(Mlp::kInDim == 4 && Mlp::kOutDim == 4);
static_assert(is_layer_v<Residual<Mlp>>);
static_assert(is_layer_v<PreNorm<LayerNorm<double, 4>, Mlp>>);
static_assert(is_layer_v<PostNorm<LayerNorm<double, 4>, Residual<Mlp>>>);
static_assert(is_layer_v<Repeat<3, Residual<Mlp>>>);
static_assert(Seq<Linear<double>, Linear<double, 3, 5>>::kOutDim == 5);
static_assert(Seq<Linear<double, 2, Dynamic>, Linear<double, 3, 5>>::kInDim == 2);  // Dynamic matches anything

TEST_CASE("Seq forward is the chain of its layers; backward in reverse", "[compose][seq]") {
  Mlp m = make_mlp(1);
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 2);
  Context ctx;
  Mlp::Cache cache;
  const Tensor3<double> y = m.forward(ctx, x, cache);
  typename Linear<double, 4, 8>::Cache c0;
  typename Silu<double, 8>::Cache c1;
  typename Linear<double, 8, 4>::Cache c2;
  const Tensor3<double> want = m.get<2>().forward(ctx, m.get<1>().forward(ctx, m.get<0>().forward(ctx, x, c0), c1), c2);
  CHECK(max_abs_diff(y, want) == 0);
  const auto r = testing::gradcheck(m, x);
  INFO(r);
  CHECK(r.ok);
  CHECK(names_of(m) == std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"});
  m.set_names({"fc1", "act", "fc2"});
  CHECK(names_of(m) == std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"});
  m.set_names({"", "", "out"});  // an empty name puts the child's parameters at this level
  CHECK(names_of(m) == std::vector<std::string>{"weight", "bias", "out.weight", "out.bias"});
}

TEST_CASE("Residual, PreNorm and PostNorm", "[compose][residual]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 3);
  Context ctx;
  {
    Residual<Mlp> res(make_mlp(4));
    Residual<Mlp>::Cache cache;
    Mlp::Cache inner;
    const Tensor3<double> y = res.forward(ctx, x, cache);
    const Tensor3<double> fx = res.inner().forward(ctx, x, inner);
    for (Index i = 0; i < y.size(); ++i) CHECK(y.data()[i] == Approx(x.data()[i] + fx.data()[i]));
    const auto r = testing::gradcheck(res, x);
    INFO(r);
    CHECK(r.ok);
    CHECK(names_of(res).front() == "0.weight");
    res.set_name("block");
    CHECK(names_of(res).front() == "block.0.weight");
  }
  {
    using Block = Residual<PreNorm<LayerNorm<double, 4>, Mlp>>;
    Block blk(PreNorm<LayerNorm<double, 4>, Mlp>(LayerNorm<double, 4>({4}), make_mlp(5)));
    testing::randomize_params(blk, 6, 0.5);
    Block::Cache cache;
    const Tensor3<double> y = blk.forward(ctx, x, cache);
    LayerNorm<double, 4>::Cache cn;
    Mlp::Cache cm;
    const Tensor3<double> fx = blk.inner().layer().forward(ctx, blk.inner().norm().forward(ctx, x, cn), cm);
    for (Index i = 0; i < y.size(); ++i) CHECK(y.data()[i] == Approx(x.data()[i] + fx.data()[i]));
    const auto r = testing::gradcheck(blk, x);
    INFO(r);
    CHECK(r.ok);
    CHECK(names_of(blk) == std::vector<std::string>{"norm.weight", "norm.bias", "layer.0.weight", "layer.0.bias",
                                                    "layer.2.weight", "layer.2.bias"});
  }
  {
    // Post-norm residual with a batchnorm, in both modes.
    using Block = PostNorm<BatchNorm<double, 4>, Residual<Mlp>>;
    Block blk(BatchNorm<double, 4>({4}), Residual<Mlp>(make_mlp(7)));
    testing::randomize_params(blk, 8, 0.5);
    for (Mode m : {Mode::train, Mode::eval}) {
      testing::GradcheckOptions opt;
      opt.mode = m;
      const auto r = testing::gradcheck(blk, x, opt);
      INFO(to_string(m) << ": " << r);
      CHECK(r.ok);
    }
    CHECK(names_of(blk).back() == "norm.num_batches_tracked");
  }
  {
    // A residual around a width-changing layer is a run-time ShapeError when widths are Dynamic.
    Residual<Linear<double>> bad(Linear<double>({4, 3}));
    Residual<Linear<double>>::Cache cache;
    CHECK_THROWS_WITH(bad.forward(ctx, x, cache), Catch::Matchers::Contains("(2, 3, 4)") &&
                                                      Catch::Matchers::Contains("(2, 3, 3)"));
  }
}

TEST_CASE("Repeat holds N blocks with their own parameters", "[compose][repeat]") {
  using Block = Residual<PreNorm<SequenceNorm<double>, Ffn<double>>>;
  auto make = [](std::size_t i) {
    Ffn<double>::Config cfg;
    cfg.dim = 4;
    cfg.hidden = 6;
    cfg.prenorm = false;  // the Ffn's own norm is post; the PreNorm adds another in front
    return Block(PreNorm<SequenceNorm<double>, Ffn<double>>(SequenceNorm<double>({NormType::layernorm, 4}),
                                                             Ffn<double>(cfg, 10 + i)));
  };
  Repeat<3, Block> rep(make);
  testing::randomize_params(rep, 9, 0.4);
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 4);
  Context ctx;
  Repeat<3, Block>::Cache cache;
  const Tensor3<double> y = rep.forward(ctx, x, cache);
  Tensor3<double> h = x;
  for (std::size_t i = 0; i < 3; ++i) {
    Block::Cache c;
    h = rep[i].forward(ctx, h, c);
  }
  CHECK(max_abs_diff(y, h) == 0);
  const auto names = names_of(rep);
  CHECK(names.front() == "0.norm.norm.weight");
  CHECK(std::find(names.begin(), names.end(), "1.layer.fc1.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "2.layer.norm.norm.bias") != names.end());
  const auto r = testing::gradcheck(rep, x);
  INFO(r);
  CHECK(r.ok);

  // Built from a prototype, the blocks start equal but are independent copies.
  Repeat<2, Mlp> twins(make_mlp(3));
  CHECK(twins[0].get<0>().weight().vec() == twins[1].get<0>().weight().vec());
  twins[0].get<0>().weight().data()[0] += 1;
  CHECK(twins[0].get<0>().weight().vec() != twins[1].get<0>().weight().vec());
  CHECK(names_of(twins)[2] == "0.2.weight");
  const auto r2 = testing::gradcheck(twins, x);
  INFO(r2);
  CHECK(r2.ok);
}

TEST_CASE("Compositions propagate ctx: dropout inside a Seq in train mode", "[compose][seq]") {
  Seq<Linear<double>, Dropout<double>, Linear<double>> net(Linear<double>({4, 16}, 1), Dropout<double>(0.5),
                                                           Linear<double>({16, 4}, 2));
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 5);
  testing::GradcheckOptions opt;
  opt.mode = Mode::train;
  const auto r = testing::gradcheck(net, x, opt);
  INFO(r);
  CHECK(r.ok);
  decltype(net)::Cache cache;
  Context train(Mode::train, 3);
  (void)net.forward(train, x, cache);
  CHECK(std::get<1>(cache.children).mask.size() == 2 * 3 * 16);
}

TEST_CASE("A ParamBuffer binds a composition; backward and reset write through it", "[compose][param]") {
  Ffn<double>::Config cfg;
  cfg.dim = 4;
  cfg.hidden = 6;
  using Net = Seq<Linear<double>, Ffn<double>>;
  Net net(Linear<double>({3, 4}, 1), Ffn<double>(cfg, 2));
  ParamBuffer<double> buf(net);
  CHECK(buf.size() == 3 * 4 + 4 + (4 + 4) + (6 * 4 + 6) + (4 * 6 + 4));
  auto in_buffer = [&](const double* p) { return p >= buf.values() && p < buf.values() + buf.size(); };
  CHECK(buf.find("1.norm.norm.weight") != nullptr);
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 3, 1);
  Context ctx;
  Net::Cache cache;
  const Tensor3<double> y = net.forward(ctx, x, cache);
  buf.zero_grad();
  (void)net.backward(ctx, y, cache);
  double grad_norm = 0;
  for (Index i = 0; i < buf.size(); ++i) grad_norm += std::abs(buf.grads()[i]);
  CHECK(grad_norm > 0);
  CHECK(net.get<0>().weight().grad()[0] == buf.grads()[0]);
  net.get<1>().reset_parameters(9);
  CHECK(in_buffer(net.get<1>().fc1().weight().data()));
  for_each_param(net, [&](const std::string& name, Param<double>& p) {
    INFO(name);
    CHECK(in_buffer(p.data()));
    CHECK(buf.find(name) == &p);
  });
}
