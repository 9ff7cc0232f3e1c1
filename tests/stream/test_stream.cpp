// Streaming inference: SeqBoatLayerStreamer / SeqBoatModelStreamer / SeqBoatLmStreamer against the full forward at
// every position (random causal configurations: relu2, softmax, laplace; none, simple, local_simple, rotary positions;
// densities none .. all; windows larger and smaller than the sequence; EMA truncation; float and double), chunked
// feeding against token-by-token, state operations and serialisation, the language model's gradient and sampling.
#include <catch2/catch.hpp>
// #include <sma/models/lm.hpp>
#include <sma/models/seqboat_stream.hpp>
#include <sma/testing/random.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

using namespace sma;
using ops::AttentionActivation;
using ops::PositionEncoding;

namespace {

struct Case {
  AttentionActivation act;
  PositionEncoding pos;
  Index window;
  Index truncation;
  double shift;  // router steering: -50 none, +50 all, else mixed
  bool prenorm;
  Index batch;
  Index length;
};

SeqBoatLayerConfig layer_config(const Case& k) {
  SeqBoatLayerConfig c;
  c.embed_dim = 12;
  c.zdim = 6;
  c.hdim = 10;
  c.ndim = 3;
  c.direction = Direction::causal;
  c.attention_activation = k.act;
  c.rel_pos = k.pos;
  c.window_size = k.window;
  c.truncation = k.truncation;
  c.max_positions = 16;  // shorter than some sequences: the simple bias clamps
  c.prenorm = k.prenorm;
  c.norm_type = k.prenorm ? NormType::layernorm : NormType::rmsnorm;
  c.routing = RoutingSemantics::per_row;
  return c;
}

/// Random weights with router logits pushed apart (large margins), shifted by `shift` to steer the density.
template <class T>
void randomize(SeqBoatLayer<T>& layer, std::uint64_t seed, double shift) {
  testing::randomize_params(layer, seed, 0.4);
  for_each_param(layer, [&](const std::string& name, Param<T>& p) {
    if (name == "norm.norm.weight") p.vec().array() += T(1);
  });
  auto& w = layer.hx_proj().weight();
  const Index in = w.dim(1);
  for (Index j = 0; j < in; ++j) {
    w.data()[j] *= T(4);
    w.data()[in + j] *= T(4);
  }
  auto& b = layer.hx_proj().bias();
  b.data()[1] += T(shift / 2);
  b.data()[0] -= T(shift / 2);
}

template <class T>
double min_margin(const typename SeqBoatLayer<T>::Cache& c) {
  double m = 1e300;
  for (Index i = 0; i < c.router.probs.rows(); ++i)
    m = std::min(m, std::abs(double(c.router.probs(i, 1)) - double(c.router.probs(i, 0))));
  return m;
}

template <class T, int R>
double max_abs(const Tensor<T, R>& t) {
  double m = 0;
  for (Index i = 0; i < t.size(); ++i) m = std::max(m, std::abs(double(t.data()[i])));
  return m;
}

/// max |a - b| / max |b| over (B, L, D) tensors.
template <class T>
double rel_err(const Tensor3<T>& a, const Tensor3<T>& b) {
  REQUIRE(a.dimensions() == b.dimensions());
  double d = 0;
  for (Index i = 0; i < a.size(); ++i) d = std::max(d, std::abs(double(a.data()[i]) - double(b.data()[i])));
  const double m = max_abs(b);
  return m > 0 ? d / m : d;
}

template <class T>
Tensor2<T> slice_t(const Tensor3<T>& x, Index t) {  // (B, L, D) -> (B, D) at position t
  Tensor2<T> y(x.dimension(0), x.dimension(2));
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index d = 0; d < x.dimension(2); ++d) y(b, d) = x(b, t, d);
  return y;
}

template <class T>
Tensor3<T> slice_range(const Tensor3<T>& x, Index t0, Index n) {  // (B, L, D) -> (B, n, D)
  Tensor3<T> y(x.dimension(0), n, x.dimension(2));
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index t = 0; t < n; ++t)
      for (Index d = 0; d < x.dimension(2); ++d) y(b, t, d) = x(b, t0 + t, d);
  return y;
}

template <class T>
void put_t(Tensor3<T>& y, Index t, const Tensor2<T>& yt) {
  for (Index b = 0; b < y.dimension(0); ++b)
    for (Index d = 0; d < y.dimension(2); ++d) y(b, t, d) = yt(b, d);
}

template <class T>
void put_range(Tensor3<T>& y, Index t0, const Tensor3<T>& yc) {
  for (Index b = 0; b < y.dimension(0); ++b)
    for (Index t = 0; t < yc.dimension(1); ++t)
      for (Index d = 0; d < y.dimension(2); ++d) y(b, t0 + t, d) = yc(b, t, d);
}

/// A layer, an input and its full forward, with every router margin above `margin` (re-drawing seeds otherwise).
template <class T>
struct Setup {
  SeqBoatLayer<T> layer;
  Tensor3<T> x, y;
  Tensor2<std::uint8_t> active;
  double density = 0;
};

template <class T>
Setup<T> make_setup(const Case& k, std::uint64_t seed, double margin) {
  for (std::uint64_t s = seed; s < seed + 50; ++s) {
    Setup<T> u{SeqBoatLayer<T>(layer_config(k), s), {}, {}, {}, 0};
    randomize(u.layer, s, k.shift);
    u.x = testing::random_tensor<T>(k.batch, k.length, 12, s + 7);
    Context ctx(Mode::eval);
    typename SeqBoatLayer<T>::Cache c;
    u.y = u.layer.forward(ctx, u.x, c);
    if (min_margin<T>(c) < margin) continue;
    u.active = c.router.active;
    u.density = c.density();
    return u;
  }
  FAIL("no seed gave router margins above " << margin);
  return {};
}

const std::vector<Case>& cases() {
  static const std::vector<Case> cs = {
      {AttentionActivation::relu2, PositionEncoding::simple, 4, 0, 0.0, true, 3, 23},
      {AttentionActivation::softmax, PositionEncoding::simple, 5, 0, 0.0, true, 2, 30},
      {AttentionActivation::relu2, PositionEncoding::rotary, 3, 0, 0.0, true, 2, 25},
      {AttentionActivation::softmax, PositionEncoding::rotary, 40, 0, 0.0, true, 2, 21},  // window > length
      {AttentionActivation::softmax, PositionEncoding::simple, 64, 0, 50.0, true, 2, 20},  // all activated
      {AttentionActivation::relu2, PositionEncoding::simple, 4, 0, 50.0, true, 1, 33},    // all, window < length
      {AttentionActivation::relu2, PositionEncoding::rotary, 6, 0, -50.0, true, 2, 19},   // none activated
      {AttentionActivation::relu2, PositionEncoding::local_simple, 4, 0, 0.0, true, 2, 27},
      {AttentionActivation::laplace, PositionEncoding::none, 5, 0, 0.0, true, 2, 22},
      {AttentionActivation::softmax, PositionEncoding::simple, 6, 7, 0.0, true, 3, 31},   // EMA truncation
      {AttentionActivation::relu2, PositionEncoding::rotary, 4, 0, 0.0, false, 2, 24},    // post-norm (rmsnorm)
  };
  return cs;
}

std::string describe(const Case& k) {
  return str_cat(ops::to_string(k.act), "/", ops::to_string(k.pos), " W=", k.window, " K=", k.truncation,
                 " shift=", k.shift, k.prenorm ? " prenorm" : " postnorm", " B=", k.batch, " L=", k.length);
}

template <class T>
constexpr double stream_tol() {
  return std::is_same<T, double>::value ? 1e-11 : 2e-5;
}

}  // namespace

TEMPLATE_TEST_CASE("layer streaming equals the full forward at every position", "[stream][layer]", double, float) {
  using T = TestType;
  const double margin = std::is_same<T, double>::value ? 1e-6 : 1e-3;
  double dens_min = 1, dens_max = 0;
  for (std::size_t i = 0; i < cases().size(); ++i) {
    const Case& k = cases()[i];
    INFO(describe(k));
    auto u = make_setup<T>(k, 100 + 10 * i, margin);
    dens_min = std::min(dens_min, u.density);
    dens_max = std::max(dens_max, u.density);
    if (k.shift > 10) CHECK(u.density == 1.0);
    if (k.shift < -10) CHECK(u.density == 0.0);
    if (k.shift == 0) {
      CHECK(u.density > 0.0);
      CHECK(u.density < 1.0);
    }
    SeqBoatLayerStreamer<T> streamer(u.layer);
    auto st = streamer.make_state(k.batch);
    Tensor3<T> ys(k.batch, k.length, 12);
    for (Index t = 0; t < k.length; ++t) {
      StreamTrace tr;
      put_t(ys, t, streamer.step(slice_t(u.x, t), st, &tr));
      for (Index b = 0; b < k.batch; ++b) REQUIRE(tr.active(b, 0) == u.active(b, t));
    }
    CHECK(rel_err(ys, u.y) < stream_tol<T>());
    for (Index b = 0; b < k.batch; ++b) {
      CHECK(st.position[static_cast<std::size_t>(b)] == k.length);
      Index on = 0;
      for (Index t = 0; t < k.length; ++t) on += u.active(b, t);
      CHECK(st.activated[static_cast<std::size_t>(b)] == on);
    }
  }
  CHECK(dens_min == 0.0);
  CHECK(dens_max == 1.0);
}

TEST_CASE("chunked feeding equals token-by-token", "[stream][chunk]") {
  for (std::size_t i = 0; i < cases().size(); ++i) {
    const Case& k = cases()[i];
    INFO(describe(k));
    auto u = make_setup<double>(k, 300 + 10 * i, 1e-6);
    SeqBoatLayerStreamer<double> streamer(u.layer);
    auto st1 = streamer.make_state(k.batch);
    Tensor3<double> y1(k.batch, k.length, 12), y2(k.batch, k.length, 12);
    for (Index t = 0; t < k.length; ++t) put_t(y1, t, streamer.step(slice_t(u.x, t), st1));
    auto st2 = streamer.make_state(k.batch);
    const Index sizes[] = {3, 1, 7, 5, 100};
    Index t = 0;
    for (int j = 0; t < k.length; ++j) {
      const Index n = std::min(sizes[j % 5], k.length - t);
      put_range(y2, t, streamer.step_chunk(slice_range(u.x, t, n), st2));
      t += n;
    }
    CHECK(rel_err(y2, y1) < 1e-13);
    CHECK(rel_err(st2.keys, st1.keys) < 1e-13);
    CHECK(rel_err(st2.ema, st1.ema) < 1e-13);
    CHECK(st2.activated == st1.activated);
    CHECK(st2.position == st1.position);
    // A whole sequence as one chunk, too.
    auto st3 = streamer.make_state(k.batch);
    CHECK(rel_err(streamer.step_chunk(u.x, st3), u.y) < 1e-11);
  }
}

TEST_CASE("B = 1 streams equal the reference semantics, also fully activated", "[stream][semantics]") {
  for (double shift : {0.0, 50.0}) {
    Case k{AttentionActivation::relu2, PositionEncoding::simple, 4, 0, shift, true, 1, 26};
    auto u = make_setup<double>(k, 500, 1e-6);
    u.layer.config().routing = RoutingSemantics::reference;
    Context ctx(Mode::eval);
    SeqBoatLayer<double>::Cache c;
    const Tensor3<double> y = u.layer.forward(ctx, u.x, c);
    CHECK(c.comp.compressed == (shift == 0.0));  // fully activated: the reference's uncompressed path
    SeqBoatLayerStreamer<double> streamer(u.layer);
    auto st = streamer.make_state(1);
    CHECK(rel_err(streamer.step_chunk(u.x, st), y) < 1e-11);
  }
}

TEST_CASE("streams of one batch are independent and each at its own position", "[stream][batch]") {
  Case k{AttentionActivation::softmax, PositionEncoding::rotary, 4, 5, 0.0, true, 3, 24};
  auto u = make_setup<double>(k, 600, 1e-6);
  SeqBoatLayerStreamer<double> streamer(u.layer);
  // Row 0 starts 5 tokens late: a batch state where row 0 was reset after 5 tokens of something else.
  auto st = streamer.make_state(3);
  Tensor3<double> noise = testing::random_tensor<double>(3, 5, 12, 9);
  streamer.step_chunk(noise, st);
  st.reset_row(0);
  auto one = streamer.make_state(1);
  Tensor3<double> x0 = slice_range(u.x, 0, 19);
  Tensor3<double> x0_row(1, 19, 12);
  for (Index t = 0; t < 19; ++t)
    for (Index d = 0; d < 12; ++d) x0_row(0, t, d) = x0(0, t, d);
  const Tensor3<double> y_one = streamer.step_chunk(x0_row, one);
  const Tensor3<double> y_all = streamer.step_chunk(x0, st);
  double diff = 0;
  for (Index t = 0; t < 19; ++t)
    for (Index d = 0; d < 12; ++d) diff = std::max(diff, std::abs(y_all(0, t, d) - y_one(0, t, d)));
  CHECK(diff < 1e-13);
  CHECK(st.position == std::vector<std::int64_t>{19, 24, 24});
}

TEST_CASE("state: copy, rows, bytes independent of the position, serialisation", "[stream][state]") {
  Case k{AttentionActivation::relu2, PositionEncoding::simple, 4, 6, 0.0, true, 2, 30};
  auto u = make_setup<double>(k, 700, 1e-6);
  SeqBoatLayerStreamer<double> streamer(u.layer);
  auto st = streamer.make_state(2);
  const std::size_t bytes0 = st.bytes();
  CHECK(bytes0 == sizeof(double) * (2 * 12 * 3 + 2 * 6 * 12 + 2 * 4 * 6 + 2 * 4 * 10 + 2) + 8 * (2 * 4 + 4) + 2);
  streamer.step_chunk(slice_range(u.x, 0, 17), st);
  CHECK(st.bytes() == bytes0);

  // Park the streams (bytes and a file), go on, then resume from the parked copies: same outputs, bit for bit.
  const auto parked = streamer.save_state(st);
  auto copy = st;
  const Tensor3<double> rest = slice_range(u.x, 17, 13);
  const Tensor3<double> y_ref = streamer.step_chunk(rest, st);
  auto resumed = streamer.load_state(parked);
  CHECK(resumed.position == copy.position);
  const Tensor3<double> y_res = streamer.step_chunk(rest, resumed);
  const Tensor3<double> y_copy = streamer.step_chunk(rest, copy);
  CHECK(rel_err(y_res, y_ref) == 0.0);
  CHECK(rel_err(y_copy, y_ref) == 0.0);

  // One stream moved into another state's slot continues exactly.
  auto parked_row = streamer.load_state(parked).row(1);
  auto other = streamer.make_state(3);
  other.set_row(2, parked_row);
  Tensor3<double> rest3(3, 13, 12);
  rest3.setZero();
  for (Index t = 0; t < 13; ++t)
    for (Index d = 0; d < 12; ++d) rest3(2, t, d) = rest(1, t, d);
  const Tensor3<double> y3 = streamer.step_chunk(rest3, other);
  double diff = 0;
  for (Index t = 0; t < 13; ++t)
    for (Index d = 0; d < 12; ++d) diff = std::max(diff, std::abs(y3(2, t, d) - y_ref(1, t, d)));
  CHECK(diff < 1e-14);  // another batch size may round the projections differently

  // Validation on load.
  SeqBoatLayerConfig c2 = layer_config(k);
  c2.window_size = 5;
  SeqBoatLayer<double> wider(c2, 1);
  SeqBoatLayerStreamer<double> s2(wider);
  CHECK_THROWS_WITH(s2.load_state(parked), Catch::Contains("window_size") && Catch::Contains("4") &&
                                               Catch::Contains("5"));
  SeqBoatLayer<double> same_shape(layer_config(k), 12345);
  SeqBoatLayerStreamer<double> s3(same_shape);
  CHECK_THROWS_WITH(s3.load_state(parked), Catch::Contains("different weights"));
  CHECK_NOTHROW(s3.load_state(parked, StreamLoadOptions{false}));
  SeqBoatLayer<float> lf(layer_config(k), 1);
  SeqBoatLayerStreamer<float> sf(lf);
  CHECK_THROWS_WITH(sf.load_state(parked, StreamLoadOptions{false}), Catch::Contains("float64"));
  std::vector<std::uint8_t> junk(parked.begin(), parked.begin() + 20);
  CHECK_THROWS(streamer.load_state(junk));
  // A state with an inconsistent count.
  auto bad = streamer.load_state(parked);
  bad.activated[0] = bad.position[0] + 1;
  CHECK_THROWS_WITH(streamer.load_state(streamer.save_state(bad)), Catch::Contains("activated"));
  // Shapes: a state of another layer, a row of another shape.
  auto st_other = s2.make_state(2);
  CHECK_THROWS_AS(streamer.step_chunk(rest, st_other), ShapeError);
  CHECK_THROWS_AS(st.set_row(0, st_other), ShapeError);
  CHECK_THROWS_AS(st.reset_row(2), ValueError);
}

TEST_CASE("streaming errors", "[stream][errors]") {
  SeqBoatLayerConfig c = layer_config({AttentionActivation::relu2, PositionEncoding::simple, 4, 0, 0, true, 1, 1});
  c.direction = Direction::bidirectional;
  SeqBoatLayer<double> bidir(c, 1);
  CHECK_THROWS_AS(SeqBoatLayerStreamer<double>(bidir), ValueError);
  c.direction = Direction::causal;
  SeqBoatLayer<double> causal(c, 1);
  SeqBoatLayerStreamer<double> s(causal);
  auto st = s.make_state(2);
  CHECK_THROWS_AS(s.step(Tensor2<double>(2, 11), st), ShapeError);
  CHECK_THROWS_AS(s.step(Tensor2<double>(3, 12), st), ShapeError);
  // The EMA's truncation changed under a live state.
  causal.ssm().set_truncation(3);
  Tensor2<double> x(2, 12);
  x.setZero();
  CHECK_THROWS_WITH(s.step(x, st), Catch::Contains("truncation"));
}

TEST_CASE("parameter changes are seen by a live streamer", "[stream][stale]") {
  Case k{AttentionActivation::relu2, PositionEncoding::simple, 4, 0, 0.0, true, 1, 12};
  auto u = make_setup<double>(k, 800, 1e-6);
  SeqBoatLayerStreamer<double> streamer(u.layer);
  auto st = streamer.make_state(1);
  streamer.step_chunk(u.x, st);
  // New EMA weights: a fresh stream must match the new full forward, not the cached coefficients.
  for_each_param(u.layer, [&](const std::string& name, Param<double>& p) {
    if (name.rfind("ssm.", 0) == 0) p.vec().array() *= 0.7;
  });
  Context ctx(Mode::eval);
  SeqBoatLayer<double>::Cache c;
  const Tensor3<double> y = u.layer.forward(ctx, u.x, c);
  if (min_margin<double>(c) > 1e-6) {
    auto st2 = streamer.make_state(1);
    CHECK(rel_err(streamer.step_chunk(u.x, st2), y) < 1e-11);
  }
}

TEST_CASE("causal SeqBoatModel streams its prefix outputs", "[stream][model]") {
  SeqBoatModelConfig mc;
  mc.d_input = 3;
  mc.d_output = 4;
  mc.d_model = 8;
  mc.n_layers = 2;
  mc.dropout = 0;
  mc.prenorm = true;
  mc.d_qk = 4;
  mc.d_ema = 2;
  mc.mem_size = 3;
  mc.bidirectional = false;
  mc.norm_type = NormType::layernorm;
  mc.rel_pos = PositionEncoding::rotary;
  mc.attention_activation = AttentionActivation::softmax;
  mc.routing = RoutingSemantics::per_row;
  mc.max_positions = 32;
  SeqBoatModel<double> model(mc, 3);
  testing::randomize_params(model, 4, 0.4);
  const Tensor3<double> x = testing::random_tensor<double>(2, 15, 3, 5);
  SeqBoatModelStreamer<double> streamer(model);
  auto st = streamer.make_state(2);
  std::vector<Tensor3<double>> outs;
  const Tensor3<double> logits = streamer.step_chunk(slice_range(x, 0, 6), st, &outs);
  REQUIRE(outs.size() == 2);
  const Tensor3<double> logits2 = streamer.step_chunk(slice_range(x, 6, 9), st);
  for (Index t : {Index(5), Index(14)}) {
    Context ctx(Mode::eval);
    SeqBoatModel<double>::Cache c;
    const Tensor2<double> full = model.forward(ctx, slice_range(x, 0, t + 1), c);
    double d = 0;
    for (Index b = 0; b < 2; ++b)
      for (Index o = 0; o < 4; ++o)
        d = std::max(d, std::abs(full(b, o) - (t == 5 ? logits(b, 5, o) : logits2(b, 8, o))));
    CHECK(d < 1e-11 * std::max(1.0, max_abs(full)));
  }
  const auto bytes = streamer.save_state(st);
  auto back = streamer.load_state(bytes);
  CHECK(back.position == st.position);
  mc.bidirectional = true;
  SeqBoatModel<double> bi(mc, 3);
  CHECK_THROWS_AS(SeqBoatModelStreamer<double>(bi), ValueError);
}
