// SeqBoatLayer, SeqBoatModel and Sma<Router, Module>: finite-difference gradient checks over the configuration
// space (sparse path with frozen routing), routing semantics, density extremes, and bad input.
#include <catch2/catch.hpp>
#include <sma/compose/residual.hpp>
#include <sma/compose/seq.hpp>
#include <sma/compose/sparse.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

using namespace sma;
using ops::AttentionActivation;
using ops::PositionEncoding;

namespace {

SeqBoatLayerConfig small_config(Direction dir, AttentionActivation act, PositionEncoding pos) {
  SeqBoatLayerConfig c;
  c.embed_dim = 8;
  c.zdim = 4;
  c.hdim = 12;
  c.ndim = 2;
  c.direction = dir;
  c.attention_activation = act;
  c.rel_pos = pos;
  c.window_size = 3;
  c.max_positions = 16;
  return c;
}

/// Random weights (the reference's init makes every router margin tiny), then the router's two logits are pushed
/// apart by `shift` to steer the density, as the golden generator does.
template <class T>
void randomize(SeqBoatLayer<T>& layer, std::uint64_t seed, double shift) {
  testing::randomize_params(layer, seed, 0.4);
  for_each_param(layer, [&](const std::string& name, Param<T>& p) {
    if (name == "norm.norm.weight") p.vec().array() += T(1);
    if (name == "norm.norm.running_var") p.fill(T(1.3));
  });
  auto& b = layer.hx_proj().bias();
  b.data()[1] += T(shift / 2);
  b.data()[0] -= T(shift / 2);
}

double layer_density(SeqBoatLayer<double>& layer, const Tensor3<double>& x, const Mask* pad = nullptr) {
  Context ctx(Mode::eval);
  ctx.padding = pad;
  SeqBoatLayer<double>::Cache c;
  layer.forward(ctx, x, c);
  return c.density(pad);
}

/// Shifts the router bias until about half of the tokens of x are activated.
void steer_to_half(SeqBoatLayer<double>& layer, const Tensor3<double>& x) {
  auto& b = layer.hx_proj().bias();
  double lo = -20, hi = 20;
  for (int it = 0; it < 40; ++it) {
    const double mid = 0.5 * (lo + hi);
    const double b0 = b.data()[0], b1 = b.data()[1];
    b.data()[1] += mid / 2;
    b.data()[0] -= mid / 2;
    const double d = layer_density(layer, x);
    b.data()[0] = b0;
    b.data()[1] = b1;
    (d < 0.5 ? lo : hi) = mid;
  }
  b.data()[1] += hi / 2;
  b.data()[0] -= hi / 2;
}

}  // namespace

TEST_CASE("SeqBoatLayer backward matches finite differences across configurations", "[seqboat][grad]") {
  struct Variant {
    Direction dir;
    AttentionActivation act;
    PositionEncoding pos;
  };
  const Variant variants[] = {
      {Direction::causal, AttentionActivation::relu2, PositionEncoding::simple},
      {Direction::bidirectional, AttentionActivation::relu2, PositionEncoding::simple},
      {Direction::causal, AttentionActivation::softmax, PositionEncoding::rotary},
      {Direction::bidirectional, AttentionActivation::softmax, PositionEncoding::local_simple},
      {Direction::causal, AttentionActivation::laplace, PositionEncoding::local_simple},
      {Direction::bidirectional, AttentionActivation::laplace, PositionEncoding::rotary},
  };
  int k = 0;
  for (const auto& v : variants) {
    SeqBoatLayer<double> layer(small_config(v.dir, v.act, v.pos));
    randomize(layer, 100 + k, 0.0);
    const auto x = testing::random_tensor<double>(2, 11, 8, 7 + k);
    steer_to_half(layer, x);
    const double density = layer_density(layer, x);
    INFO("variant " << k << " density " << density);
    CHECK(density > 0.15);
    CHECK(density < 0.85);
    const auto r = testing::gradcheck(layer, x);
    INFO(r);
    CHECK(r.ok);
    ++k;
  }
}

TEST_CASE("SeqBoatLayer gradients: post-norm BatchNorm (train and eval), truncation, padding, both EMA algorithms",
          "[seqboat][grad]") {
  auto cfg = small_config(Direction::bidirectional, AttentionActivation::relu2, PositionEncoding::simple);
  cfg.norm_type = NormType::batchnorm;
  cfg.prenorm = false;
  for (Mode mode : {Mode::eval, Mode::train}) {
    SeqBoatLayer<double> layer(cfg);
    randomize(layer, 5, 0.0);
    const auto x = testing::random_tensor<double>(3, 9, 8, 11);
    testing::GradcheckOptions opt;
    opt.mode = mode;
    const auto r = testing::gradcheck(layer, x, opt);
    INFO(to_string(mode) << ": " << r);
    CHECK(r.ok);
  }
  auto causal = small_config(Direction::causal, AttentionActivation::softmax, PositionEncoding::simple);
  causal.truncation = 4;
  for (EmaAlgo algo : {EmaAlgo::scan, EmaAlgo::fft, EmaAlgo::direct}) {
    causal.ema_algo = algo;
    SeqBoatLayer<double> layer(causal);
    randomize(layer, 9, 0.2);
    const auto x = testing::random_tensor<double>(3, 10, 8, 12);
    const Mask pad = testing::padding_from_lengths({10, 6, 3}, 10);
    testing::GradcheckOptions opt;
    opt.padding = &pad;
    const auto r = testing::gradcheck(layer, x, opt);
    INFO(to_string(algo) << ": " << r);
    CHECK(r.ok);
  }
}

TEST_CASE("SeqBoatLayer with dropout in training: seeded, and its backward matches finite differences",
          "[seqboat][grad][dropout]") {
  auto cfg = small_config(Direction::causal, AttentionActivation::relu2, PositionEncoding::simple);
  cfg.dropout = 0.2;
  cfg.hidden_dropout = 0.3;
  SeqBoatLayer<double> layer(cfg);
  randomize(layer, 21, 0.2);
  const auto x = testing::random_tensor<double>(2, 8, 8, 3);
  auto run = [&](std::uint64_t seed) {
    Context ctx(Mode::train, seed);
    SeqBoatLayer<double>::Cache c;
    return layer.forward(ctx, x, c);
  };
  const Tensor3<double> a = run(1), b = run(1), c = run(2);
  CHECK(as_matrix(a) == as_matrix(b));
  CHECK((as_matrix(a) - as_matrix(c)).norm() > 1e-6);
  testing::GradcheckOptions opt;
  opt.mode = Mode::train;
  const auto r = testing::gradcheck(layer, x, opt);
  INFO(r);
  CHECK(r.ok);
}

TEST_CASE("SeqBoatLayer with attention dropout: eval ignores it, training is seeded and its backward is exact",
          "[seqboat][grad][dropout]") {
  for (auto dir : {Direction::causal, Direction::bidirectional})
    for (double other_dropout : {0.0, 0.2}) {  // 0: the fused path; > 0: the step-by-step path
      auto cfg = small_config(dir, AttentionActivation::softmax, PositionEncoding::simple);
      cfg.dropout = other_dropout;
      SeqBoatLayer<double> plain(cfg);
      randomize(plain, 23, 0.0);
      cfg.attention_dropout = 0.4;
      SeqBoatLayer<double> layer(cfg);
      randomize(layer, 23, 0.0);  // the same parameters as `plain`
      const auto x = testing::random_tensor<double>(2, 12, 8, 5);
      steer_to_half(plain, x);
      steer_to_half(layer, x);  // eval mode ignores attention dropout: the same steps, the same bias
      INFO("direction " << int(dir) << " dropout " << other_dropout);
      const double density = layer_density(layer, x);
      INFO("density " << density);
      REQUIRE(density > 0.3);
      REQUIRE(density < 1.0);
      Context eval(Mode::eval);
      SeqBoatLayer<double>::Cache c1, c2;
      CHECK(as_matrix(layer.forward(eval, x, c1)) == as_matrix(plain.forward(eval, x, c2)));
      auto train = [&](SeqBoatLayer<double>& l, std::uint64_t seed) {
        Context ctx(Mode::train, seed);
        SeqBoatLayer<double>::Cache c;
        return l.forward(ctx, x, c);
      };
      const Tensor3<double> a = train(layer, 1), b = train(layer, 1);
      CHECK(as_matrix(a) == as_matrix(b));
      CHECK((as_matrix(a) - as_matrix(train(plain, 1))).norm() > 1e-6);
      testing::GradcheckOptions opt;
      opt.mode = Mode::train;
      const auto r = testing::gradcheck(layer, x, opt);
      INFO(r);
      CHECK(r.ok);
    }
}

TEST_CASE("density extremes: nothing routed leaves the attention branch without gradient; everything routed works",
          "[seqboat][grad][density]") {
  auto cfg = small_config(Direction::bidirectional, AttentionActivation::softmax, PositionEncoding::simple);
  const auto x = testing::random_tensor<double>(2, 9, 8, 4);
  {
    SeqBoatLayer<double> layer(cfg);
    randomize(layer, 1, -60.0);
    REQUIRE(layer_density(layer, x) == 0.0);
    const auto r = testing::gradcheck(layer, x);
    INFO(r);
    CHECK(r.ok);
    for_each_param(layer, [&](const std::string& name, Param<double>& p) {
      const bool attention = name.rfind("mx_proj", 0) == 0 || name.rfind("h_proj", 0) == 0 || name == "gamma" ||
                             name == "beta" || name.rfind("rel_pos_bias", 0) == 0 || name == "q_router.temp";
      if (attention) CHECK(p.grad_vec().cwiseAbs().maxCoeff() == 0.0);
    });
  }
  {
    SeqBoatLayer<double> layer(cfg);
    randomize(layer, 2, 60.0);
    REQUIRE(layer_density(layer, x) == 1.0);
    const auto r = testing::gradcheck(layer, x);
    INFO(r);
    CHECK(r.ok);
  }
}

TEST_CASE("routing semantics: reference and per_row agree unless a row is fully activated", "[seqboat][routing]") {
  auto cfg = small_config(Direction::causal, AttentionActivation::relu2, PositionEncoding::simple);
  cfg.window_size = 1;
  SeqBoatLayer<double> ref(cfg);
  randomize(ref, 31, 0.0);
  cfg.routing = RoutingSemantics::per_row;
  SeqBoatLayer<double> plain = ref;
  plain.config().routing = RoutingSemantics::per_row;
  auto run = [](SeqBoatLayer<double>& l, const Tensor3<double>& x, SeqBoatLayer<double>::Cache& c) {
    Context ctx(Mode::eval);
    return l.forward(ctx, x, c);
  };
  const auto x = testing::random_tensor<double>(2, 12, 8, 5);
  SeqBoatLayer<double>::Cache c1, c2;
  const auto y1 = run(ref, x, c1), y2 = run(plain, x, c2);
  REQUIRE(c1.comp.max_active() < 12);
  CHECK((as_matrix(y1) - as_matrix(y2)).cwiseAbs().maxCoeff() == 0.0);
  // Make row 0 fully activated (a large input along the router direction is not needed: shift the bias only for
  // a batch where row 0 is constant-activating): use a copy of x whose row 0 repeats a token that routes to 1.
  Index t_on = -1;
  for (Index t = 0; t < 12; ++t)
    if (c1.router.active(0, t)) t_on = t;
  REQUIRE(t_on >= 0);
  Tensor3<double> x2 = x;
  for (Index t = 0; t < 12; ++t)
    for (Index d = 0; d < 8; ++d) x2(0, t, d) = x(0, t_on, d);
  SeqBoatLayer<double>::Cache d1, d2;
  const auto z1 = run(ref, x2, d1), z2 = run(plain, x2, d2);
  if (d1.comp.max_active() == 12 && d1.comp.num_active[1] < 12 && d1.comp.num_active[1] > 1) {
    CHECK_FALSE(d1.comp.compressed);
    CHECK(d2.comp.compressed);
    // Row 0 is the same either way; row 1 sees its window counted in different units.
    double row0 = 0, row1 = 0;
    for (Index t = 0; t < 12; ++t)
      for (Index d = 0; d < 8; ++d) {
        row0 = std::max(row0, std::abs(z1(0, t, d) - z2(0, t, d)));
        row1 = std::max(row1, std::abs(z1(1, t, d) - z2(1, t, d)));
      }
    CHECK(row0 < 1e-12);
    CHECK(row1 > 1e-9);
  } else {
    WARN("row 0 did not become fully activated; semantics difference not exercised");
  }
}

namespace {
/// SeqBoatModel's logits (B, C) seen as (B, 1, C), so the generic gradient check applies.
struct ModelAsLayer {
  using Scalar = double;
  using Cache = SeqBoatModel<double>::Cache;
  static constexpr Index kInDim = Dynamic, kOutDim = Dynamic;
  SeqBoatModel<double> model;
  template <class V>
  void visit_params(V&& v) {
    model.visit_params(v);
  }
  Tensor3<double> forward(Context& ctx, const Tensor3<double>& x, Cache& c) const {
    const Tensor2<double> y = model.forward(ctx, x, c);
    Tensor3<double> out(y.dimension(0), 1, y.dimension(1));
    std::copy(y.data(), y.data() + y.size(), out.data());
    return out;
  }
  Tensor3<double> backward(Context& ctx, const Tensor3<double>& dy, const Cache& c) {
    Tensor2<double> d(dy.dimension(0), dy.dimension(2));
    std::copy(dy.data(), dy.data() + dy.size(), d.data());
    return model.backward(ctx, d, c);
  }
};
}  // namespace

TEST_CASE("SeqBoatModel backward matches finite differences (pre-norm and post-norm)", "[seqboat][grad][model]") {
  for (bool prenorm : {true, false}) {
    SeqBoatModelConfig cfg;
    cfg.d_input = 3;
    cfg.d_output = 4;
    cfg.d_model = 8;
    cfg.n_layers = 2;
    cfg.dropout = 0;
    cfg.prenorm = prenorm;
    cfg.d_qk = 4;
    cfg.d_ema = 2;
    cfg.mem_size = 3;
    cfg.max_positions = 16;
    cfg.norm_type = prenorm ? NormType::layernorm : NormType::batchnorm;
    cfg.bidirectional = !prenorm;
    ModelAsLayer m{SeqBoatModel<double>(cfg, 3)};
    testing::randomize_params(m, 17, 0.4);
    for_each_param(m, [](const std::string& name, Param<double>& p) {
      if (name.find("norm.weight") != std::string::npos) p.vec().array() += 1.0;
      if (name.find("running_var") != std::string::npos) p.fill(1.2);
    });
    const auto x = testing::random_tensor<double>(2, 10, 3, 8);
    const Mask pad = testing::padding_from_lengths({10, 7}, 10);
    testing::GradcheckOptions opt;
    opt.padding = &pad;
    const auto r = testing::gradcheck(m, x, opt);
    INFO("prenorm " << prenorm << ": " << r);
    CHECK(r.ok);
  }
}

TEST_CASE("Sma<LinearRouter, Gau> composes into a custom hybrid whose gradients are right", "[sma][grad]") {
  using T = double;
  Gau<T>::Config gc;
  gc.dim = 6;
  gc.zdim = 4;
  gc.hdim = 8;
  gc.attention.window = 2;
  gc.attention.direction = Direction::causal;
  gc.attention.activation = AttentionActivation::softmax;
  gc.attention.position = PositionEncoding::simple;
  gc.attention.max_positions = 16;
  using Hybrid = Seq<Residual<MultiHeadEma<T>>, Residual<Sma<LinearRouter<T>, Gau<T>>>>;
  typename MultiHeadEma<T>::Config ec;
  ec.dim = 6;
  ec.ndim = 2;
  Hybrid h(Residual<MultiHeadEma<T>>(MultiHeadEma<T>(ec, 1)),
           Residual<Sma<LinearRouter<T>, Gau<T>>>(Sma<LinearRouter<T>, Gau<T>>(LinearRouter<T>({6, 2, 1.0}, 2), Gau<T>(gc))));
  testing::randomize_params(h, 4, 0.5);
  std::vector<std::string> names;
  for_each_param(h, [&](const std::string& n, Param<T>&) { names.push_back(n); });
  CHECK(std::find(names.begin(), names.end(), "1.router.proj.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "1.module.mx_proj.weight") != names.end());
  const auto x = testing::random_tensor<T>(2, 9, 6, 6);
  const auto r = testing::gradcheck(h, x);
  INFO(r);
  CHECK(r.ok);
}

TEST_CASE("bad input names the problem", "[seqboat][errors]") {
  auto cfg = small_config(Direction::causal, AttentionActivation::relu2, PositionEncoding::simple);
  SeqBoatLayer<double> layer(cfg);
  Context ctx(Mode::eval);
  SeqBoatLayer<double>::Cache c;
  const auto wrong = testing::random_tensor<double>(2, 5, 7, 1);
  CHECK_THROWS_WITH(layer.forward(ctx, wrong, c), Catch::Matchers::Contains("expected shape (*, *, 8), got (2, 5, 7)"));
  auto zero_window = cfg;
  zero_window.window_size = 0;
  CHECK_THROWS_WITH(SeqBoatLayer<double>(zero_window), Catch::Matchers::Contains("window_size must be >= 1, got 0"));
  const auto x = testing::random_tensor<double>(2, 5, 8, 1);
  const Mask bad = testing::padding_from_lengths({5, 5, 5}, 5);
  ctx.padding = &bad;
  CHECK_THROWS_AS(layer.forward(ctx, x, c), ShapeError);
  ctx.padding = nullptr;
  Tensor3<double> nan = x;
  nan(1, 2, 3) = std::nan("");
  ctx.check_finite = true;
  CHECK_THROWS_AS(layer.forward(ctx, nan, c), NumericError);
  auto bad_act = nlohmann::json::parse(R"({"embed_dim": 8, "zdim": 4, "hdim": 8, "attention_activation": "tanh"})");
  CHECK_THROWS_WITH(SeqBoatLayerConfig::from_reference_json(bad_act), Catch::Matchers::Contains("tanh"));
  auto bad_pos = nlohmann::json::parse(R"({"embed_dim": 8, "zdim": 4, "hdim": 8, "rel_pos_bias": "alibi"})");
  CHECK_THROWS_WITH(SeqBoatLayerConfig::from_reference_json(bad_pos), Catch::Matchers::Contains("alibi"));
  auto odd_rotary = cfg;
  odd_rotary.zdim = 5;
  odd_rotary.rel_pos = PositionEncoding::rotary;
  CHECK_THROWS_WITH(SeqBoatLayer<double>(odd_rotary), Catch::Matchers::Contains("even zdim"));
}
