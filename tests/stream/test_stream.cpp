// Streaming inference: SeqBoatLayerStreamer / SeqBoatModelStreamer / SeqBoatLmStreamer against the full forward at
// every position (random causal configurations: relu2, softmax, laplace; none, simple, local_simple, rotary positions;
// densities none .. all; windows larger and smaller than the sequence; EMA truncation; float and double), chunked
// feeding against token-by-token, state operations and serialisation, the language model's gradient and sampling,
// and run_case_stream (sma-golden --stream) over the golden cases.
#include "golden/golden_case.hpp"

#include <catch2/catch.hpp>
#include <sma/models/lm.hpp>
#include <sma/models/seqboat_stream.hpp>
#include <sma/testing/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
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
  CHECK(back.row(0).bytes() * 2 == back.bytes());
  auto three = streamer.make_state(3);
  three.set_row(2, back, 1);
  CHECK(three.position[2] == 15);
  {  // the moved stream continues like the original
    const Tensor3<double> nx3 = testing::random_tensor<double>(3, 2, 3, 77);
    Tensor3<double> nx2(2, 2, 3);
    nx2.setZero();
    for (Index t = 0; t < 2; ++t)
      for (Index d = 0; d < 3; ++d) nx2(1, t, d) = nx3(2, t, d);
    const Tensor3<double> y3 = streamer.step_chunk(nx3, three);
    const Tensor3<double> y2 = streamer.step_chunk(nx2, back);
    double d = 0;
    for (Index t = 0; t < 2; ++t)
      for (Index o = 0; o < 4; ++o) d = std::max(d, std::abs(y3(2, t, o) - y2(1, t, o)));
    CHECK(d < 1e-13);
  }
  three.reset_row(2);
  CHECK(three.position[2] == 0);
  mc.bidirectional = true;
  SeqBoatModel<double> bi(mc, 3);
  CHECK_THROWS_AS(SeqBoatModelStreamer<double>(bi), ValueError);
}

// ---- the language model ----

namespace {

SeqBoatLmConfig lm_config(PositionEncoding pos, AttentionActivation act, Index ffn) {
  SeqBoatLmConfig c;
  c.vocab_size = 11;
  c.embed_dim = 8;
  c.hidden_dim = 10;
  c.zdim = 4;
  c.ndim = 2;
  c.ffn_hidden_dim = ffn;
  c.layers = 2;
  c.window_size = 3;
  c.max_positions = 16;
  c.rel_pos = pos;
  c.attention_activation = act;
  return c;
}

/// Random weights with large router margins (see randomize).
template <class T>
void randomize_lm(SeqBoatLm<T>& lm, std::uint64_t seed) {
  testing::randomize_params(lm, seed, 0.4);
  for (Index i = 0; i < lm.num_layers(); ++i) randomize(lm.layer(i), seed + 1 + std::uint64_t(i), 0.0);
  for_each_param(lm, [&](const std::string& name, Param<T>& p) {
    if (name.find("norm.norm.weight") != std::string::npos) p.vec().array() = p.vec().array() * T(0.2) + T(1);
  });
}

Tensor2<std::int32_t> random_tokens(Index B, Index L, Index V, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensor2<std::int32_t> t(B, L);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<std::int32_t>(rng() % std::uint64_t(V));
  return t;
}

/// Re-draws the weights until, on `tok`, every layer routes some tokens but not all, with margins above `margin`.
template <class T>
void randomize_lm_mixed(SeqBoatLm<T>& lm, std::uint64_t seed, const Tensor2<std::int32_t>& tok, double margin) {
  for (std::uint64_t s = seed; s < seed + 200; ++s) {
    randomize_lm(lm, s);
    Context ctx(Mode::eval);
    typename SeqBoatLm<T>::Cache c;
    lm.forward(ctx, tok, c);
    bool ok = true;
    for (const auto& lc : c.layers) {
      const double d = lc.density();
      ok = ok && d > 0 && d < 1 && min_margin<T>(lc) > margin;
    }
    if (ok) return;
  }
  FAIL("no seed gave a mixed routing");
}

}  // namespace

TEMPLATE_TEST_CASE("LM streaming equals the full forward, token by token and chunked", "[stream][lm]", double, float) {
  using T = TestType;
  for (auto pos : {PositionEncoding::simple, PositionEncoding::rotary}) {
    for (Index ffn : {Index(0), Index(12)}) {
      SeqBoatLm<T> lm(lm_config(pos, pos == PositionEncoding::simple ? AttentionActivation::softmax
                                                                     : AttentionActivation::relu2, ffn), 1);
      const Tensor2<std::int32_t> tok = random_tokens(2, 20, 11, 3);
      randomize_lm_mixed(lm, 17 + std::uint64_t(ffn), tok, 1e-3);
      Context ctx(Mode::eval);
      typename SeqBoatLm<T>::Cache c;
      const Tensor3<T> full = lm.forward(ctx, tok, c);
      for (Index i = 0; i < lm.num_layers(); ++i) {
        INFO("layer " << i);
        CHECK(min_margin<T>(c.layers[static_cast<std::size_t>(i)]) > 1e-3);
        const double dens = c.layers[static_cast<std::size_t>(i)].density();
        CHECK(dens > 0.0);
        CHECK(dens < 1.0);
      }
      SeqBoatLmStreamer<T> streamer(lm);
      auto st = streamer.make_state(2);
      Tensor3<T> ys(2, 20, 11);
      for (Index t = 0; t < 20; ++t) {
        const Tensor2<T> lt = streamer.step({tok(0, t), tok(1, t)}, st);
        put_t(ys, t, lt);
      }
      CHECK(rel_err(ys, full) < stream_tol<T>());
      auto st2 = streamer.make_state(2);
      Tensor3<T> yc(2, 20, 11);
      for (Index t0 = 0; t0 < 20; t0 += 6) {
        const Index n = std::min<Index>(6, 20 - t0);
        Tensor2<std::int32_t> part(2, n);
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < n; ++t) part(b, t) = tok(b, t0 + t);
        put_range(yc, t0, streamer.step_chunk(part, st2));
      }
      CHECK(rel_err(yc, ys) < (std::is_same<T, double>::value ? 1e-13 : 1e-5));
      CHECK(st2.position == std::vector<std::int64_t>{20, 20});
    }
  }
}

TEST_CASE("LM gradient: finite differences along random directions", "[stream][lm][grad]") {
  SeqBoatLm<double> lm(lm_config(PositionEncoding::simple, AttentionActivation::softmax, 12), 2);
  randomize_lm(lm, 5);
  const Tensor2<std::int32_t> tok = random_tokens(2, 9, 11, 8);
  std::vector<std::int64_t> targets(18);
  for (std::size_t i = 0; i < targets.size(); ++i) targets[i] = static_cast<std::int64_t>((i * 7 + 3) % 11);
  targets[4] = -100;  // ignored
  Mask pad(2, 9);
  pad.setZero();
  pad(1, 7) = pad(1, 8) = 1;  // trailing padding in row 1
  targets[16] = targets[17] = -100;
  Context ctx(Mode::eval);
  ctx.padding = &pad;
  SeqBoatLm<double>::Cache c;
  zero_grad(lm);
  lm.loss(ctx, tok, targets, c, true);
  std::vector<Param<double>*> ps;
  for_each_param(lm, [&](const std::string&, Param<double>& p) {
    if (p.trainable()) ps.push_back(&p);
  });
  std::mt19937_64 rng(11);
  std::normal_distribution<double> nd;
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<std::vector<double>> dir;
    double analytic = 0;
    for (auto* p : ps) {
      dir.emplace_back(static_cast<std::size_t>(p->size()));
      for (Index i = 0; i < p->size(); ++i) {
        dir.back()[static_cast<std::size_t>(i)] = nd(rng);
        analytic += dir.back()[static_cast<std::size_t>(i)] * p->grad()[i];
      }
    }
    auto loss_at = [&](double eps) {
      for (std::size_t k = 0; k < ps.size(); ++k)
        for (Index i = 0; i < ps[k]->size(); ++i) ps[k]->data()[i] += eps * dir[k][static_cast<std::size_t>(i)];
      SeqBoatLm<double>::Cache cc;
      const double l = lm.loss(ctx, tok, targets, cc, false).loss;
      for (std::size_t k = 0; k < ps.size(); ++k)
        for (Index i = 0; i < ps[k]->size(); ++i) ps[k]->data()[i] -= eps * dir[k][static_cast<std::size_t>(i)];
      return l;
    };
    const double h = 1e-5;
    const double numeric = (8 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12 * h);
    INFO("analytic " << analytic << " numeric " << numeric);
    CHECK(std::abs(analytic - numeric) < 1e-6 * std::max(1.0, std::abs(numeric)));
  }
}

TEST_CASE("LM: padded positions do not change the real tokens' logits", "[stream][lm]") {
  SeqBoatLm<double> lm(lm_config(PositionEncoding::rotary, AttentionActivation::relu2, 12), 2);
  randomize_lm(lm, 6);
  Tensor2<std::int32_t> tok = random_tokens(2, 10, 11, 9);
  Mask pad(2, 10);
  pad.setZero();
  for (Index t = 6; t < 10; ++t) pad(0, t) = 1;
  Context ctx(Mode::eval);
  ctx.padding = &pad;
  SeqBoatLm<double>::Cache c1, c2;
  const Tensor3<double> a = lm.forward(ctx, tok, c1);
  tok(0, 8) = (tok(0, 8) + 1) % 11;
  const Tensor3<double> b = lm.forward(ctx, tok, c2);
  double d = 0;
  for (Index t = 0; t < 6; ++t)
    for (Index v = 0; v < 11; ++v) d = std::max(d, std::abs(a(0, t, v) - b(0, t, v)));
  CHECK(d == 0.0);
  tok(0, 3) = 11;
  CHECK_THROWS_WITH(lm.forward(ctx, tok, c2), Catch::Contains("outside [0, 11)"));
}

TEST_CASE("sampling: greedy, top-k, temperature, seeds", "[stream][sample]") {
  const std::vector<double> logits = {0.1, 2.0, -1.0, 2.0, 0.5};
  std::mt19937_64 rng(1);
  SamplingOptions greedy;
  greedy.temperature = 0;
  CHECK(sample_token(logits.data(), 5, greedy, rng) == 1);  // ties -> lower id
  SamplingOptions k1;
  k1.top_k = 1;
  CHECK(sample_token(logits.data(), 5, k1, rng) == 1);
  SamplingOptions k2;
  k2.top_k = 2;
  k2.temperature = 0.7;
  std::vector<int> counts(5, 0);
  for (int i = 0; i < 4000; ++i) ++counts[static_cast<std::size_t>(sample_token(logits.data(), 5, k2, rng))];
  CHECK(counts[0] + counts[2] + counts[4] == 0);
  CHECK(std::abs(counts[1] - 2000) < 200);
  SamplingOptions all;
  all.temperature = 1.0;
  std::fill(counts.begin(), counts.end(), 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[static_cast<std::size_t>(sample_token(logits.data(), 5, all, rng))];
  double z = 0;
  for (double l : logits) z += std::exp(l);
  for (std::size_t v = 0; v < 5; ++v) CHECK(std::abs(counts[v] / double(n) - std::exp(logits[v]) / z) < 0.01);
  std::mt19937_64 r1(42), r2(42);
  for (int i = 0; i < 50; ++i) CHECK(sample_token(logits.data(), 5, all, r1) == sample_token(logits.data(), 5, all, r2));
  SamplingOptions bad;
  bad.temperature = -1;
  CHECK_THROWS_AS(sample_token(logits.data(), 5, bad, rng), ValueError);
  const std::vector<double> nan = {0.0, std::nan("")};
  CHECK_THROWS_AS(sample_token(nan.data(), 2, all, rng), NumericError);
}

TEST_CASE("LM generation continues the state; batches equal single streams", "[stream][generate]") {
  SeqBoatLm<double> lm(lm_config(PositionEncoding::simple, AttentionActivation::softmax, 12), 3);
  randomize_lm(lm, 21);
  SeqBoatLmStreamer<double> streamer(lm);
  SamplingOptions greedy;
  greedy.temperature = 0;
  const std::vector<std::int32_t> prompt = {1, 4, 2, 7};
  auto st = streamer.make_state(1);
  const auto out = generate(streamer, st, prompt, 12, greedy);
  REQUIRE(out.size() == 12);
  CHECK(st.position[0] == 15);  // everything but the last generated token
  // Each greedy token is the argmax of the full forward over everything before it.
  std::vector<std::int32_t> seq = prompt;
  for (std::size_t i = 0; i < out.size(); ++i) {
    Tensor2<std::int32_t> t(1, static_cast<Index>(seq.size()));
    std::copy(seq.begin(), seq.end(), t.data());
    Context ctx(Mode::eval);
    SeqBoatLm<double>::Cache c;
    const Tensor3<double> l = lm.forward(ctx, t, c);
    Index best = 0;
    for (Index v = 1; v < 11; ++v)
      if (l(0, t.dimension(1) - 1, v) > l(0, t.dimension(1) - 1, best)) best = v;
    CHECK(out[i] == best);
    seq.push_back(out[i]);
  }
  // Going on from the returned state (last token first) equals generating everything at once.
  const auto more = generate(streamer, st, {out.back()}, 5, greedy);
  CHECK(st.position[0] == 20);
  auto fresh = streamer.make_state(1);
  const auto all = generate(streamer, fresh, prompt, 17, greedy);
  std::vector<std::int32_t> joined = out;
  joined.insert(joined.end(), more.begin(), more.end());
  CHECK(all == joined);
  // n = 0 consumes the prompt but its last token.
  auto zero = streamer.make_state(1);
  CHECK(generate(streamer, zero, prompt, 0, greedy).empty());
  CHECK(zero.position[0] == 3);
  // Batches with prompts of different lengths, sampled: equal to each prompt alone with seed + b.
  SamplingOptions samp;
  samp.temperature = 0.9;
  samp.top_k = 5;
  samp.seed = 77;
  const std::vector<std::vector<std::int32_t>> prompts = {{3}, {1, 2, 3, 4, 5, 6}, {9, 9}};
  auto bst = streamer.make_state(3);
  const auto outs = generate_batch(streamer, bst, prompts, 7, samp);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    auto one = streamer.make_state(1);
    SamplingOptions sb = samp;
    sb.seed = samp.seed + b;
    CHECK(generate(streamer, one, prompts[b], 7, sb) == outs[b]);
    CHECK(bst.position[b] == static_cast<std::int64_t>(prompts[b].size() + 6));
    CHECK(bst.position[b] == one.position[0]);
  }
  CHECK_THROWS_AS(generate(streamer, st, {}, 3, greedy), ValueError);
}

TEST_CASE("LM state serialisation and checkpoints", "[stream][lm][io]") {
  SeqBoatLm<float> lm(lm_config(PositionEncoding::rotary, AttentionActivation::softmax, 12), 4);
  randomize_lm(lm, 31);
  SeqBoatLmStreamer<float> streamer(lm);
  auto st = streamer.make_state(2);
  streamer.step_chunk(random_tokens(2, 13, 11, 1), st);
  const std::size_t bytes = st.bytes();
  const auto parked = streamer.save_state(st);
  const Tensor2<std::int32_t> more = random_tokens(2, 5, 11, 2);
  const Tensor3<float> y1 = streamer.step_chunk(more, st);
  CHECK(st.bytes() == bytes);
  auto back = streamer.load_state(parked);
  CHECK(rel_err(streamer.step_chunk(more, back), y1) == 0.0);

  // Checkpoint round trip through a file.
  const std::string path = "/tmp/sma_test_stream_lm.safetensors";
  save_lm_checkpoint(lm, path, {{"vocab", "abcdefghijk"}});
  auto ck = load_lm_checkpoint<float>(path);
  CHECK(ck.metadata.at("vocab") == "abcdefghijk");
  SeqBoatLmStreamer<float> s2(ck.model);
  auto back2 = s2.load_state(parked);  // same weights: the fingerprint matches
  CHECK(rel_err(s2.step_chunk(more, back2), y1) == 0.0);
  std::remove(path.c_str());

  // Another model's configuration is refused by name.
  SeqBoatLmConfig other = lm_config(PositionEncoding::rotary, AttentionActivation::softmax, 12);
  other.layers = 3;
  SeqBoatLm<float> lm3(other, 4);
  SeqBoatLmStreamer<float> s3(lm3);
  CHECK_THROWS_WITH(s3.load_state(parked), Catch::Contains("layers"));
  // Rows move between states of the same model.
  auto four = streamer.make_state(4);
  four.set_row(3, streamer.load_state(parked), 1);
  CHECK(four.position[3] == 13);
  CHECK_THROWS_AS(four.set_row(0, s3.make_state(1)), ShapeError);
  CHECK_THROWS_WITH(SeqBoatLmConfig::from_json(nlohmann::json{{"vocab_size", 3}, {"embed_dimm", 4}}),
                    Catch::Contains("embed_dimm"));
}

// ---- sma-golden --stream ----

namespace {

std::string golden_dir() {
  if (const char* env = std::getenv("SMA_GOLDEN_DIR")) return env;
  return SMA_GOLDEN_DIR_DEFAULT;
}

}  // namespace

TEST_CASE("run_case_stream: every causal golden case streams to the stored outputs", "[stream][golden]") {
  namespace fs = std::filesystem;
  if (!fs::is_directory(golden_dir())) {
    WARN("no golden cases in " << golden_dir());
    return;
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(golden_dir()))
    if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  int streamed = 0, skipped = 0;
  for (const auto& f : files) {
    const auto r = golden::run_case_stream<double>(f);
    INFO(r.name << ": " << r.failure);
    if (r.skipped) {
      ++skipped;
      CHECK((r.note == "bidirectional" || r.note == "not a sequence model"));
      continue;
    }
    ++streamed;
    CHECK(r.ok);
    CHECK(r.note.empty());  // no golden case needs the per_row fallback comparison
    CHECK(r.max_rel_err < 1e-12);
    golden::RunOptions o32;
    o32.tolerance = 1e-4;
    o32.zero_tolerance = 1e-5;
    CHECK(golden::run_case_stream<float>(f, o32).ok);
  }
  if (!files.empty()) {
    CHECK(streamed >= 10);
    CHECK(skipped >= 14);
  }
}

TEST_CASE("run_case_stream: after the reference's batch-wide fallback it compares with the per_row forward",
          "[stream][golden]") {
  // A causal B = 2 case where row 0 is fully activated and row 1 is not: the reference ran the batch uncompressed.
  const nlohmann::json cfg = {{"embed_dim", 12}, {"zdim", 6},         {"hdim", 10},          {"ndim", 3},
                              {"bidirectional", false}, {"window_size", 2}, {"rel_pos_bias", "simple"},
                              {"max_positions", 16},    {"attention_activation", "relu2"}};
  const SeqBoatLayerConfig lc = SeqBoatLayerConfig::from_reference_json(cfg);
  const Index B = 2, L = 9, D = 12;
  for (std::uint64_t seed = 1; seed < 400; ++seed) {
    SeqBoatLayer<double> layer(lc, seed);
    randomize(layer, seed, 2.0 + double(seed % 7));
    const Tensor3<double> x = testing::random_tensor<double>(B, L, D, seed + 3);
    Context ctx(Mode::eval);
    SeqBoatLayer<double>::Cache c;
    const Tensor3<double> y_ref = layer.forward(ctx, x, c);
    if (c.comp.compressed || c.comp.num_active[1] == L || min_margin<double>(c) < 1e-6) continue;
    layer.config().routing = RoutingSemantics::per_row;
    SeqBoatLayer<double>::Cache c2;
    const Tensor3<double> y_row = layer.forward(ctx, x, c2);
    if (rel_err(y_row, y_ref) < 1e-6) continue;  // wanted: a batch on which the two semantics differ
    io::SafetensorsWriter w;
    io::add_state_dict(layer, w);
    Tensor3<double> xt(L, B, D), yt(L, B, D);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t)
        for (Index d = 0; d < D; ++d) {
          xt(t, b, d) = x(b, t, d);
          yt(t, b, d) = y_ref(b, t, d);
        }
    w.add("input", xt).add("output", yt);
    const std::uint8_t compress = 0;
    w.add("inter.compress", &compress, {});
    const std::vector<std::int64_t> num = {c.comp.num_active[0], c.comp.num_active[1]};
    w.add("inter.num_active", num.data(), {B});
    w.set_metadata("case", "synthetic_fallback").set_metadata("kind", "layer").set_metadata("config", cfg.dump());
    const std::string path = "/tmp/sma_test_stream_fallback.safetensors";
    w.save(path);
    const auto r = golden::run_case_stream<double>(path);
    INFO(r.failure);
    CHECK(r.ok);
    CHECK_THAT(r.note, Catch::Contains("per_row"));
    CHECK(r.max_rel_err < 1e-12);
    std::remove(path.c_str());
    return;
  }
  FAIL("no seed gave a batch with one fully activated row and one not");
}
