// Tests of sma::ops::local_attention_{forward,backward} (include/sma/ops/local_attention.hpp):
//   - forward against naive O(S^2) loops written from the maths (every activation x position x direction, ragged
//     rows with an empty row and rows shorter than the window, key masks, several query block sizes);
//   - backward against central differences in double (q, k, v and the bias table);
//   - the reference's own bucketed algorithm (look_around, -5e4 masking, FastRelativePositionalBias), emulated
//     literally, on uncompressed sequences;
//   - the attention_output intermediates of the official golden cases;
//   - determinism across thread counts, and the error messages.
#include <catch2/catch.hpp>
#include <sma/ops/local_attention.hpp>
#include <sma/ops/rel_pos.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace sma;
using ops::AttentionActivation;
using ops::LocalAttentionConfig;
using ops::PositionEncoding;

namespace {

const AttentionActivation kActivations[] = {AttentionActivation::relu2, AttentionActivation::softmax,
                                            AttentionActivation::laplace};
const PositionEncoding kPositions[] = {PositionEncoding::none, PositionEncoding::simple,
                                       PositionEncoding::local_simple, PositionEncoding::rotary};
const Direction kDirections[] = {Direction::causal, Direction::bidirectional};

std::string describe(const LocalAttentionConfig& c) {
  return str_cat(ops::to_string(c.activation), " ", ops::to_string(c.position), " ", to_string(c.direction),
                 " W=", c.window, " block=", c.query_block);
}

// A packed batch of ragged rows with everything the op reads, in double.
struct Problem {
  std::vector<Index> offsets;
  Index S = 0, Z = 0, H = 0;
  Matrix<double> q, k, v;
  std::vector<std::int64_t> pos;
  std::vector<std::uint8_t> valid;
  bool use_valid = false;
  std::vector<double> table;

  ops::LocalAttentionInput<double> input() const {
    return {CMatrixMap<double>(q.data(), S, Z), CMatrixMap<double>(k.data(), S, Z),
            CMatrixMap<double>(v.data(), S, H), &offsets, &pos, use_valid ? &valid : nullptr};
  }
};

Problem make_problem(const std::vector<Index>& lengths, Index Z, Index H, const LocalAttentionConfig& cfg,
                     std::uint64_t seed, bool use_valid, double qk_std = 1.0) {
  Problem p;
  p.Z = Z;
  p.H = H;
  p.offsets.push_back(0);
  for (Index n : lengths) p.offsets.push_back(p.offsets.back() + n);
  p.S = p.offsets.back();
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  p.q.resize(p.S, Z);
  p.k.resize(p.S, Z);
  p.v.resize(p.S, H);
  for (Index i = 0; i < p.q.size(); ++i) p.q.data()[i] = qk_std * n01(rng);
  for (Index i = 0; i < p.k.size(); ++i) p.k.data()[i] = qk_std * n01(rng);
  for (Index i = 0; i < p.v.size(); ++i) p.v.data()[i] = n01(rng);
  // Original positions: increasing with gaps, as after compression (gaps make |pos_j - pos_i| exceed P).
  std::uniform_int_distribution<int> gap(1, 4), start(0, 5);
  for (std::size_t b = 0; b + 1 < p.offsets.size(); ++b) {
    std::int64_t t = start(rng);
    for (Index s = p.offsets[b]; s < p.offsets[b + 1]; ++s, t += gap(rng)) p.pos.push_back(t);
  }
  p.use_valid = use_valid;
  std::bernoulli_distribution keep(0.75);
  for (Index s = 0; s < p.S; ++s) p.valid.push_back(keep(rng) ? 1 : 0);
  std::normal_distribution<double> tb(0.0, 0.5);
  p.table.resize(static_cast<std::size_t>(cfg.bias_table_size()));
  for (double& x : p.table) x = tb(rng);
  return p;
}

// Naive forward, written from the maths (not from the op's helpers). min_abs_score: smallest |s_ij| over visible
// pairs, to keep relu2's finite differences away from its kink.
Matrix<double> naive_forward(const LocalAttentionConfig& cfg, const Problem& p, double* min_abs_score = nullptr) {
  const ops::detail::DropoutMask drop(cfg.dropout, cfg.dropout_seed);
  const Index W = cfg.window, Z = p.Z, P = cfg.max_positions;
  const bool causal = cfg.direction == Direction::causal;
  double scale = causal ? 1.0 / W : 1.0 / (2.0 * W);
  if (cfg.activation == AttentionActivation::softmax) scale = 1.0 / std::sqrt(double(Z));
  const auto rotated = [&](const Matrix<double>& m, Index r) {
    std::vector<double> x(m.row(r).data(), m.row(r).data() + Z);
    if (cfg.position == PositionEncoding::rotary) {
      for (Index mm = 0; mm < Z / 2; ++mm) {
        const double angle = double(p.pos[r]) * std::pow(cfg.rotary_theta, -2.0 * mm / double(Z));
        const std::complex<double> c = std::complex<double>(x[2 * mm], x[2 * mm + 1]) * std::polar(1.0, angle);
        x[2 * mm] = c.real();
        x[2 * mm + 1] = c.imag();
      }
    }
    return x;
  };
  Matrix<double> out = Matrix<double>::Zero(p.S, p.H);
  double min_abs = 1e300;
  for (std::size_t b = 0; b + 1 < p.offsets.size(); ++b) {
    const Index r0 = p.offsets[b], r1 = p.offsets[b + 1];
    for (Index i = r0; i < r1; ++i) {
      const std::vector<double> qi = rotated(p.q, i);
      std::vector<Index> js;
      std::vector<double> s;
      for (Index j = r0; j < r1; ++j) {
        const bool in_window = causal ? (j <= i && j >= i - W) : std::abs(i - j) <= W;
        if (!in_window || (p.use_valid && !p.valid[j])) continue;
        const std::vector<double> kj = rotated(p.k, j);
        double dot = 0;
        for (Index z = 0; z < Z; ++z) dot += scale * qi[z] * kj[z];
        if (cfg.position == PositionEncoding::simple) {
          std::int64_t idx = P - 1 + p.pos[j] - p.pos[i];
          idx = std::max<std::int64_t>(0, std::min<std::int64_t>(idx, 2 * P - 2));
          dot += p.table[idx];
        } else if (cfg.position == PositionEncoding::local_simple) {
          dot += p.table[4 * W - 1 + j - i];
        }
        js.push_back(j);
        s.push_back(dot);
        min_abs = std::min(min_abs, std::abs(dot));
      }
      if (js.empty()) continue;
      std::vector<double> a(s.size());
      if (cfg.activation == AttentionActivation::softmax) {
        const double m = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (std::size_t t = 0; t < s.size(); ++t) sum += a[t] = std::exp(s[t] - m);
        for (double& x : a) x /= sum;
      } else if (cfg.activation == AttentionActivation::relu2) {
        for (std::size_t t = 0; t < s.size(); ++t) a[t] = s[t] > 0 ? s[t] * s[t] : 0.0;
      } else {
        const double mu = std::sqrt(0.5), sigma = std::sqrt(1.0 / (4.0 * M_PI));
        for (std::size_t t = 0; t < s.size(); ++t) a[t] = 0.5 * (1.0 + std::erf((s[t] - mu) / (sigma * std::sqrt(2.0))));
      }
      if (drop.on)
        for (std::size_t t = 0; t < js.size(); ++t) a[t] *= drop.keep(i, js[t]) ? 1.0 / (1.0 - cfg.dropout) : 0.0;
      for (std::size_t t = 0; t < js.size(); ++t) out.row(i) += a[t] * p.v.row(js[t]);
    }
  }
  if (min_abs_score) *min_abs_score = min_abs;
  return out;
}

double max_abs(const Matrix<double>& m) { return m.size() ? m.cwiseAbs().maxCoeff() : 0.0; }

// f = sum(out .* G); returns f for the problem as it stands.
double loss(const LocalAttentionConfig& cfg, const Problem& p, const Matrix<double>& G) {
  const Matrix<double> out = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr);
  return (out.array() * G.array()).sum();
}

// Central differences on every element of q, k, v and the table against local_attention_backward.
void check_gradients(const LocalAttentionConfig& cfg, Problem p, std::uint64_t seed) {
  INFO(describe(cfg));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  Matrix<double> G(p.S, p.H);
  for (Index i = 0; i < G.size(); ++i) G.data()[i] = n01(rng);

  ops::LocalAttentionSaved<double> saved;
  const Matrix<double> out = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), &saved);
  REQUIRE(out.allFinite());
  Matrix<double> dq, dk, dv;
  const double sentinel = 0.25;
  std::vector<double> dtable(p.table.size(), sentinel);
  ops::local_attention_backward<double>(cfg, p.input(), p.table.data(), saved, CMatrixMap<double>(G.data(), p.S, p.H),
                                        dq, dk, dv, dtable.empty() ? nullptr : dtable.data());
  REQUIRE(dq.rows() == p.S);
  REQUIRE(dk.rows() == p.S);
  REQUIRE(dv.rows() == p.S);
  REQUIRE(dq.allFinite());
  REQUIRE(dk.allFinite());
  REQUIRE(dv.allFinite());

  const double eps = 1e-6, rtol = 1e-6, atol = 1e-7;
  double norm = 0;
  const auto compare = [&](const char* name, double* x, Index n, const double* analytic, double offset) {
    for (Index e = 0; e < n; ++e) {
      const double x0 = x[e];
      x[e] = x0 + eps;
      const double fp = loss(cfg, p, G);
      x[e] = x0 - eps;
      const double fm = loss(cfg, p, G);
      x[e] = x0;
      const double num = (fp - fm) / (2 * eps), ana = analytic[e] - offset;
      norm += std::abs(ana);
      INFO(name << "[" << e << "]: analytic " << ana << " numeric " << num);
      REQUIRE(std::abs(ana - num) <= atol + rtol * std::max(std::abs(ana), std::abs(num)));
    }
  };
  compare("q", p.q.data(), p.q.size(), dq.data(), 0.0);
  compare("k", p.k.data(), p.k.size(), dk.data(), 0.0);
  compare("v", p.v.data(), p.v.size(), dv.data(), 0.0);
  compare("table", p.table.data(), static_cast<Index>(p.table.size()), dtable.data(), sentinel);
  CHECK(norm > 0);  // not a vacuous pass
}

// A problem whose relu2 scores keep a margin from the kink at 0 (first seed that gives one).
Problem relu2_safe_problem(const std::vector<Index>& lengths, Index Z, Index H, const LocalAttentionConfig& cfg,
                           bool use_valid) {
  for (std::uint64_t seed = 1; seed < 500; ++seed) {
    Problem p = make_problem(lengths, Z, H, cfg, seed, use_valid);
    double margin = 0;
    naive_forward(cfg, p, &margin);
    if (margin > 1e-5) return p;  // a step of 1e-6 moves any score by at most ~1e-6
  }
  FAIL("no seed gave relu2 scores a margin of 1e-5 from the kink");
  return {};
}

}  // namespace

TEST_CASE("local attention forward matches naive loops in double", "[attention][local_attention]") {
  const std::vector<Index> lengths{0, 3, 17, 40, 0, 9};  // an empty row, rows shorter than some windows
  for (auto act : kActivations)
    for (auto pos : kPositions)
      for (auto dir : kDirections)
        for (Index W : {1, 4, 50})
          for (Index block : {0, 4})
            for (bool masked : {false, true}) {
              LocalAttentionConfig cfg;
              cfg.window = W;
              cfg.direction = dir;
              cfg.activation = act;
              cfg.position = pos;
              cfg.max_positions = 8;
              cfg.query_block = block;
              const Problem p = make_problem(lengths, 6, 5, cfg, 7 + W, masked);
              INFO(describe(cfg) << " masked=" << masked);
              ops::LocalAttentionSaved<double> saved;
              const Matrix<double> got = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), &saved);
              const Matrix<double> want = naive_forward(cfg, p);
              REQUIRE(got.rows() == p.S);
              REQUIRE(got.cols() == p.H);
              REQUIRE(max_abs(want) > 0);
              CHECK(max_abs(got - want) <= 1e-12 * std::max(1.0, max_abs(want)));
              CHECK(saved.row_stat.size() == (act == AttentionActivation::softmax ? p.S : 0));
            }
}

TEST_CASE("local attention forward in float matches the double maths", "[attention][local_attention]") {
  const std::vector<Index> lengths{5, 0, 33, 12};
  for (auto act : kActivations)
    for (auto pos : kPositions)
      for (auto dir : kDirections)
        for (Index W : {2, 7}) {
          LocalAttentionConfig cfg;
          cfg.window = W;
          cfg.direction = dir;
          cfg.activation = act;
          cfg.position = pos;
          cfg.max_positions = 16;
          const Problem p = make_problem(lengths, 8, 6, cfg, 100 + W, true);
          INFO(describe(cfg));
          const Matrix<float> qf = p.q.cast<float>(), kf = p.k.cast<float>(), vf = p.v.cast<float>();
          const std::vector<float> tf(p.table.begin(), p.table.end());
          const ops::LocalAttentionInput<float> in{CMatrixMap<float>(qf.data(), p.S, p.Z),
                                                   CMatrixMap<float>(kf.data(), p.S, p.Z),
                                                   CMatrixMap<float>(vf.data(), p.S, p.H), &p.offsets, &p.pos, &p.valid};
          const Matrix<float> got = ops::local_attention_forward<float>(cfg, in, tf.data(), nullptr);
          const Matrix<double> want = naive_forward(cfg, p);
          CHECK(max_abs(got.cast<double>() - want) <= 1e-5 * std::max(1.0, max_abs(want)));
        }
}

TEST_CASE("local attention backward matches central differences", "[attention][local_attention][grad]") {
  // W=3 with blocks of 4: the 20-slot row spans three backward segments (both colours); W=25 exceeds every row.
  const std::vector<Index> lengths{0, 3, 11, 0, 20};
  for (auto act : kActivations)
    for (auto pos : kPositions)
      for (auto dir : kDirections)
        for (Index W : {3, 25}) {
          LocalAttentionConfig cfg;
          cfg.window = W;
          cfg.direction = dir;
          cfg.activation = act;
          cfg.position = pos;
          cfg.max_positions = 6;
          cfg.query_block = 4;
          const bool masked = W == 3;
          Problem p = act == AttentionActivation::relu2 ? relu2_safe_problem(lengths, 4, 3, cfg, masked)
                                                        : make_problem(lengths, 4, 3, cfg, 11, masked);
          check_gradients(cfg, p, 99);
        }
}

TEST_CASE("attention dropout: the mask is applied after the activation and regenerated in backward",
          "[attention][local_attention][dropout][grad]") {
  const std::vector<Index> lengths{0, 3, 11, 20};
  for (auto act : kActivations)
    for (auto pos : kPositions)
      for (auto dir : kDirections) {
        LocalAttentionConfig cfg;
        cfg.window = 3;
        cfg.direction = dir;
        cfg.activation = act;
        cfg.position = pos;
        cfg.max_positions = 6;
        cfg.query_block = 4;
        cfg.dropout = 0.3;
        cfg.dropout_seed = 1234;
        Problem p = act == AttentionActivation::relu2 ? relu2_safe_problem(lengths, 4, 3, cfg, true)
                                                      : make_problem(lengths, 4, 3, cfg, 11, true);
        INFO(describe(cfg));
        const Matrix<double> got = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr);
        const Matrix<double> want = naive_forward(cfg, p);
        CHECK(max_abs(got - want) <= 1e-12 * std::max(1.0, max_abs(want)));
        LocalAttentionConfig plain = cfg;
        plain.dropout = 0;
        CHECK(max_abs(got - naive_forward(plain, p)) > 1e-3);  // the mask did something
        check_gradients(cfg, p, 5);
      }
}

TEST_CASE("attention dropout: drops about p of the pairs, depends on the seed, not on the threads",
          "[attention][local_attention][dropout]") {
  for (double prob : {0.1, 0.5}) {
    const ops::detail::DropoutMask m(prob, 77), other(prob, 78);
    Index dropped = 0, differ = 0;
    const Index n = 400;
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < n; ++j) {
        dropped += !m.keep(i, j);
        differ += m.keep(i, j) != other.keep(i, j);
      }
    const double share = double(dropped) / double(n * n);
    INFO("p=" << prob << " dropped share " << share);
    CHECK(std::abs(share - prob) < 0.005);  // 160,000 draws: the standard error is at most 0.00125
    CHECK(differ > n * n * prob * (1 - prob));  // independent seeds disagree on 2p(1-p) of the pairs
  }
  LocalAttentionConfig cfg;
  cfg.window = 5;
  cfg.direction = Direction::bidirectional;
  cfg.activation = AttentionActivation::softmax;
  cfg.position = PositionEncoding::simple;
  cfg.max_positions = 32;
  cfg.dropout = 0.2;
  cfg.dropout_seed = 9;
  const Problem p = make_problem({40, 0, 70, 33}, 8, 6, cfg, 3, true);
  cfg.threads = 1;
  const Matrix<double> one = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr);
  cfg.threads = 2;
  const Matrix<double> two = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr);
  CHECK(one == two);
  cfg.dropout_seed = 10;
  CHECK(max_abs(one - ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr)) > 1e-3);
  cfg.dropout = 1.0;
  CHECK_THROWS_WITH(ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr),
                    Catch::Matchers::Contains("dropout must be in [0, 1)"));
}

TEST_CASE("local attention backward: relu2 with positive scores everywhere and automatic blocks",
          "[attention][local_attention][grad]") {
  // Shifted bias: every visible score is well above the kink, so every weight and gradient is active.
  LocalAttentionConfig cfg;
  cfg.window = 5;
  cfg.direction = Direction::bidirectional;
  cfg.activation = AttentionActivation::relu2;
  cfg.position = PositionEncoding::simple;
  cfg.max_positions = 4;
  Problem p = make_problem({14, 1, 30}, 6, 4, cfg, 5, false, 0.3);
  for (double& x : p.table) x += 2.0;
  double margin = 0;
  naive_forward(cfg, p, &margin);
  REQUIRE(margin > 0.5);
  check_gradients(cfg, p, 3);
}

TEST_CASE("softmax backward recomputes the log-sum-exp when none was saved", "[attention][local_attention]") {
  LocalAttentionConfig cfg;
  cfg.window = 6;
  cfg.activation = AttentionActivation::softmax;
  cfg.position = PositionEncoding::simple;
  cfg.max_positions = 10;
  cfg.query_block = 4;
  const Problem p = make_problem({25, 4, 0, 13}, 4, 3, cfg, 21, true);
  Matrix<double> G = Matrix<double>::Random(p.S, p.H);
  ops::LocalAttentionSaved<double> saved, empty;
  ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), &saved);
  Matrix<double> dq1, dk1, dv1, dq2, dk2, dv2;
  std::vector<double> db1(p.table.size(), 0.0), db2(p.table.size(), 0.0);
  const CMatrixMap<double> g(G.data(), p.S, p.H);
  ops::local_attention_backward<double>(cfg, p.input(), p.table.data(), saved, g, dq1, dk1, dv1, db1.data());
  ops::local_attention_backward<double>(cfg, p.input(), p.table.data(), empty, g, dq2, dk2, dv2, db2.data());
  CHECK(max_abs(dq1 - dq2) < 1e-13);
  CHECK(max_abs(dk1 - dk2) < 1e-13);
  CHECK(max_abs(dv1 - dv2) < 1e-13);
  for (std::size_t e = 0; e < db1.size(); ++e) CHECK(std::abs(db1[e] - db2[e]) < 1e-13);
}

TEST_CASE("softmax: a query with no visible key outputs 0 and gets no gradient", "[attention][local_attention]") {
  LocalAttentionConfig cfg;
  cfg.window = 1;
  cfg.activation = AttentionActivation::softmax;
  cfg.position = PositionEncoding::none;
  Problem p = make_problem({4}, 2, 2, cfg, 1, true);
  p.valid = {1, 0, 0, 1};  // query 2 sees keys 1 and 2, both masked
  ops::LocalAttentionSaved<double> saved;
  const Matrix<double> out = ops::local_attention_forward<double>(cfg, p.input(), nullptr, &saved);
  CHECK(out.row(2).cwiseAbs().maxCoeff() == 0.0);
  CHECK(std::isinf(saved.row_stat[2]));
  CHECK(out.row(1).isApprox(p.v.row(0)));  // only key 0 visible
  Matrix<double> G = Matrix<double>::Ones(4, 2), dq, dk, dv;
  ops::local_attention_backward<double>(cfg, p.input(), nullptr, saved, CMatrixMap<double>(G.data(), 4, 2), dq, dk,
                                        dv, nullptr);
  CHECK(dq.row(2).cwiseAbs().maxCoeff() == 0.0);
  CHECK(dv.row(2).cwiseAbs().maxCoeff() == 0.0);  // masked keys get no gradient
  CHECK(dk.row(1).cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("local attention results do not depend on the thread count", "[attention][local_attention]") {
  for (auto act : kActivations)
  for (auto dir : kDirections) {
    LocalAttentionConfig cfg;
    cfg.window = 40;
    cfg.direction = dir;
    cfg.activation = act;
    cfg.position = PositionEncoding::simple;
    cfg.max_positions = 64;
    const Problem p = make_problem({300, 7, 0, 500}, 8, 16, cfg, 3, true);
    Matrix<double> G = Matrix<double>::Random(p.S, p.H);
    const CMatrixMap<double> g(G.data(), p.S, p.H);
    Matrix<double> out[2], dq[2], dk[2], dv[2];
    std::vector<double> db[2];
    for (int t = 0; t < 2; ++t) {
      cfg.threads = t + 1;
      ops::LocalAttentionSaved<double> saved;
      out[t] = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), &saved);
      db[t].assign(p.table.size(), 0.0);
      ops::local_attention_backward<double>(cfg, p.input(), p.table.data(), saved, g, dq[t], dk[t], dv[t],
                                            db[t].data());
    }
    CHECK(out[0] == out[1]);
    CHECK(dq[0] == dq[1]);
    CHECK(dk[0] == dk[1]);
    CHECK(dv[0] == dv[1]);
    CHECK(db[0] == db[1]);
  }
}

// ---- the reference's bucketed algorithm, emulated literally (SeqBoatLayer.local_attention) ----

namespace {

// FastRelativePositionalBias(max_positions)(seq_len): the pad / tile / view / slice construction.
Matrix<double> reference_rel_pos(const std::vector<double>& w, Index max_positions, Index L) {
  std::vector<double> b;
  if (L <= max_positions) {
    const Index start = max_positions - L;
    b.assign(w.begin() + start, w.begin() + start + 2 * L - 1);
  } else {
    const Index delta = L - max_positions;
    b.assign(static_cast<std::size_t>(delta), w.front());
    b.insert(b.end(), w.begin(), w.end());
    b.insert(b.end(), static_cast<std::size_t>(delta), w.back());
  }
  std::vector<double> t = b;
  t.insert(t.end(), static_cast<std::size_t>(L), 0.0);  // 3L-1
  std::vector<double> tiled;
  for (Index r = 0; r < L; ++r) tiled.insert(tiled.end(), t.begin(), t.end());
  tiled.resize(tiled.size() - static_cast<std::size_t>(L));  // L * (3L-2)
  const Index cols = 3 * L - 2, r = (2 * L - 1) / 2;
  Matrix<double> out(L, L);
  for (Index i = 0; i < L; ++i)
    for (Index j = 0; j < L; ++j) out(i, j) = tiled[static_cast<std::size_t>(i * cols + r + j)];
  return out;
}

// One uncompressed sequence: q, k, v (L, .), key mask (1 = keep), positions = slot indices.
Matrix<double> reference_local_attention(const LocalAttentionConfig& cfg, Matrix<double> q, Matrix<double> k,
                                         const Matrix<double>& v, const std::vector<std::uint8_t>& mask,
                                         const std::vector<double>& table) {
  const Index L = q.rows(), Z = q.cols(), H = v.cols(), W = cfg.window;
  const bool causal = cfg.direction == Direction::causal, softmax = cfg.activation == AttentionActivation::softmax;
  if (cfg.position == PositionEncoding::rotary) {  // apply_rotary_emb with freqs_cis[:L]
    for (Index t = 0; t < L; ++t)
      for (Index m = 0; m < Z / 2; ++m) {
        const double freq = 1.0 / std::pow(cfg.rotary_theta, double(2 * m) / double(Z));
        const std::complex<double> f = std::polar(1.0, double(t) * freq);
        for (Matrix<double>* x : {&q, &k}) {
          const std::complex<double> c = std::complex<double>((*x)(t, 2 * m), (*x)(t, 2 * m + 1)) * f;
          (*x)(t, 2 * m) = c.real();
          (*x)(t, 2 * m + 1) = c.imag();
        }
      }
  }
  q *= softmax ? 1.0 / std::sqrt(double(Z)) : 1.0 / double(causal ? W : 2 * W);
  Matrix<double> attn_bias;
  if (cfg.position == PositionEncoding::simple) attn_bias = reference_rel_pos(table, cfg.max_positions, L);
  const Index n = (L + W - 1) / W * W, windows = n / W, back = 1, fwd = causal ? 0 : 1, cols = (back + fwd + 1) * W;
  Matrix<double> local_bias;
  if (cfg.position == PositionEncoding::local_simple) local_bias = reference_rel_pos(table, 3 * W, cols);
  const double mask_value = softmax ? -5e4 : 0.0;
  Matrix<double> out = Matrix<double>::Zero(L, H);
  for (Index w = 0; w < windows; ++w)
    for (Index ii = 0; ii < W; ++ii) {
      const Index i = w * W + ii;  // bq_t
      std::vector<double> sim(static_cast<std::size_t>(cols));
      for (Index c = 0; c < cols; ++c) {
        const Index kk = (w - back) * W + c;                       // bq_k before padding
        const bool pad = kk < 0 || kk >= n;                         // look_around's pad_value -1
        double s = 0;
        for (Index z = 0; z < Z; ++z) s += (i < L ? q(i, z) : 0.0) * (pad ? -1.0 : (kk < L ? k(kk, z) : 0.0));
        if (cfg.position == PositionEncoding::local_simple) {
          s += local_bias(ii, c);
        } else if (cfg.position == PositionEncoding::simple) {
          s += (!pad && i < L && kk < L) ? attn_bias(i, kk) : 0.0;  // padded bias and look_around_2d pad are 0
        }
        const Index bqk = pad ? -1 : kk;
        bool masked;
        if (causal) {
          masked = i < bqk || i > bqk + W || pad;
        } else {
          masked = (bqk - W > i) || (i > bqk + W) || pad;
        }
        const bool key_keep = !pad && kk < L && mask[static_cast<std::size_t>(kk)];
        if (masked || !key_keep) s = mask_value;
        sim[static_cast<std::size_t>(c)] = s;
      }
      std::vector<double> a(sim.size());
      if (softmax) {
        const double m = *std::max_element(sim.begin(), sim.end());
        double sum = 0;
        for (std::size_t c = 0; c < sim.size(); ++c) sum += a[c] = std::exp(sim[c] - m);
        for (double& x : a) x /= sum;
      } else {
        for (std::size_t c = 0; c < sim.size(); ++c) a[c] = sim[c] > 0 ? sim[c] * sim[c] : 0.0;
      }
      if (i >= L) continue;
      for (Index c = 0; c < cols; ++c) {
        const Index kk = (w - back) * W + c;
        const bool pad = kk < 0 || kk >= n;
        for (Index h = 0; h < H; ++h) out(i, h) += a[static_cast<std::size_t>(c)] * (pad ? -1.0 : (kk < L ? v(kk, h) : 0.0));
      }
    }
  return out;
}

}  // namespace

TEST_CASE("local attention agrees with the reference's bucketed algorithm on uncompressed rows",
          "[attention][local_attention][reference]") {
  for (auto act : {AttentionActivation::relu2, AttentionActivation::softmax})
    for (auto pos : kPositions)
      for (auto dir : kDirections)
        for (Index W : {1, 3, 4})
          for (Index L : {1, 7, 12, 13}) {
            LocalAttentionConfig cfg;
            cfg.window = W;
            cfg.direction = dir;
            cfg.activation = act;
            cfg.position = pos;
            cfg.max_positions = 5;  // < L sometimes: the clamped branch of FastRelativePositionalBias
            Problem p = make_problem({L}, 4, 3, cfg, 40 + L + W, true);
            for (Index s = 0; s < L; ++s) p.pos[static_cast<std::size_t>(s)] = s;
            INFO(describe(cfg) << " L=" << L);
            const Matrix<double> got = ops::local_attention_forward<double>(cfg, p.input(), p.table.data(), nullptr);
            const Matrix<double> want = reference_local_attention(cfg, p.q, p.k, p.v, p.valid, p.table);
            for (Index i = 0; i < L; ++i) {
              bool any = false;  // the reference differs (uniform weights) only where no key is visible
              for (Index j = std::max<Index>(0, i - W); j <= std::min(L - 1, i + (dir == Direction::causal ? 0 : W)); ++j)
                any = any || p.valid[static_cast<std::size_t>(j)];
              if (!any && act == AttentionActivation::softmax) continue;
              INFO("query " << i);
              CHECK(max_abs(got.row(i) - want.row(i)) <= 1e-12 * std::max(1.0, max_abs(want)));
            }
          }
}

// ---- golden cases: attention_output of the official reference ----

namespace {

struct SafeTensors {
  nlohmann::json header;
  std::vector<char> data;

  static bool load(const std::string& path, SafeTensors& st) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::uint64_t n = 0;
    f.read(reinterpret_cast<char*>(&n), 8);
    std::string h(n, ' ');
    f.read(&h[0], static_cast<std::streamsize>(n));
    st.header = nlohmann::json::parse(h);
    st.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    return true;
  }
  bool has(const std::string& name) const { return header.contains(name); }
  std::vector<Index> shape(const std::string& name) const {
    return header.at(name).at("shape").get<std::vector<Index>>();
  }
  template <class X>
  std::vector<X> get(const std::string& name) const {
    const auto& e = header.at(name);
    const auto off = e.at("data_offsets").get<std::vector<std::size_t>>();
    std::vector<X> out((off[1] - off[0]) / sizeof(X));
    std::copy(data.data() + off[0], data.data() + off[1], reinterpret_cast<char*>(out.data()));
    return out;
  }
  nlohmann::json config() const { return nlohmann::json::parse(header.at("__metadata__").at("config").get<std::string>()); }
};

std::string golden_dir() {
  if (const char* env = std::getenv("SMA_GOLDEN_DIR")) return env;
#ifdef SMA_GOLDEN_DIR_DEFAULT
  return SMA_GOLDEN_DIR_DEFAULT;
#else
  return "/work/shared/golden";
#endif
}

// Runs the op on one SeqBoat layer's stored mx_proj output and returns max|got - want| / max|want| over the rows of
// activated tokens (the others are filler the reference discards).
double golden_layer_error(const SafeTensors& st, const std::string& prefix, const nlohmann::json& c,
                          bool model_config) {
  const Index Z = model_config ? c.at("d_qk").get<Index>() : c.at("zdim").get<Index>();
  const Index H = model_config ? 2 * c.at("d_model").get<Index>() : c.at("hdim").get<Index>();
  LocalAttentionConfig cfg;
  cfg.window = model_config ? c.at("mem_size").get<Index>() : c.at("window_size").get<Index>();
  cfg.direction = c.at("bidirectional").get<bool>() ? Direction::bidirectional : Direction::causal;
  cfg.activation = ops::parse_attention_activation(c.at("attention_activation").get<std::string>());
  cfg.max_positions = c.at("max_positions").get<Index>();
  const std::string rel = c.at("rel_pos_bias").get<std::string>();
  const bool local_pos = !model_config && c.at("local_pos").get<bool>();
  cfg.position = rel == "rotary" ? PositionEncoding::rotary
                                 : (local_pos ? PositionEncoding::local_simple : PositionEncoding::simple);

  const std::string param = model_config ? prefix.substr(std::string("inter.").size()) : "";
  const auto mx = st.get<double>(prefix + "mx_proj_output");
  const auto sh = st.shape(prefix + "mx_proj_output");  // (B, C', Z + 2H)
  const Index B = sh[0], C = sh[1];
  REQUIRE(sh[2] == Z + 2 * H);
  const auto gamma = st.get<double>(param + "gamma"), beta = st.get<double>(param + "beta");  // (2, Z)
  const auto mask = st.get<std::uint8_t>(prefix + "activation_mask");                        // (B, T)
  const Index T = st.shape(prefix + "activation_mask")[1];
  const auto num_active = st.get<std::int64_t>(prefix + "num_active");
  const bool compress = st.get<std::uint8_t>(prefix + "compress")[0] != 0;
  const auto want = st.get<double>(prefix + "attention_output");  // (B, C', H)
  std::vector<double> table;
  if (cfg.bias_table_size() > 0) table = st.get<double>(param + "rel_pos_bias.rel_pos_bias");
  REQUIRE(static_cast<Index>(table.size()) == cfg.bias_table_size());

  // Compressed: ragged rows of the activated tokens only. Uncompressed: every slot, non-activated keys masked.
  std::vector<Index> offsets{0};
  std::vector<std::int64_t> positions;
  std::vector<std::uint8_t> valid;
  std::vector<std::pair<Index, Index>> slot;  // (b, c) of each packed row
  for (Index b = 0; b < B; ++b) {
    Index a = 0;
    for (Index t = 0; t < T; ++t) {
      const bool active = mask[static_cast<std::size_t>(b * T + t)] != 0;
      if (compress && !active) continue;
      positions.push_back(t);
      valid.push_back(active ? 1 : 0);
      slot.emplace_back(b, compress ? a : t);
      ++a;
    }
    REQUIRE((compress ? a : T) == (compress ? num_active[static_cast<std::size_t>(b)] : C));
    offsets.push_back(static_cast<Index>(positions.size()));
  }
  const Index S = offsets.back();
  Matrix<double> q(S, Z), k(S, Z), v(S, H);
  for (Index s = 0; s < S; ++s) {
    const auto [b, cc] = slot[static_cast<std::size_t>(s)];
    const double* row = mx.data() + (b * C + cc) * (Z + 2 * H);
    const auto silu = [](double x) { return x / (1.0 + std::exp(-x)); };
    for (Index z = 0; z < Z; ++z) {
      const double zz = silu(row[z]);
      q(s, z) = zz * gamma[z] + beta[z];
      k(s, z) = zz * gamma[Z + z] + beta[Z + z];
    }
    for (Index h = 0; h < H; ++h) v(s, h) = silu(row[Z + H + h]);
  }
  const ops::LocalAttentionInput<double> in{CMatrixMap<double>(q.data(), S, Z), CMatrixMap<double>(k.data(), S, Z),
                                            CMatrixMap<double>(v.data(), S, H), &offsets, &positions,
                                            compress ? nullptr : &valid};
  const Matrix<double> got = ops::local_attention_forward<double>(cfg, in, table.empty() ? nullptr : table.data(),
                                                                  nullptr);
  double err = 0, scale = 0;
  for (Index s = 0; s < S; ++s) {
    if (!valid[static_cast<std::size_t>(s)]) continue;
    const auto [b, cc] = slot[static_cast<std::size_t>(s)];
    for (Index h = 0; h < H; ++h) {
      const double w = want[static_cast<std::size_t>((b * C + cc) * H + h)];
      err = std::max(err, std::abs(got(s, h) - w));
      scale = std::max(scale, std::abs(w));
    }
  }
  return scale > 0 ? err / scale : err;
}

}  // namespace

TEST_CASE("local attention reproduces the golden attention_output of every SeqBoat case",
          "[attention][local_attention][golden]") {
  const char* layer_cases[] = {"layer_bidir_relu2_ln_prenorm", "layer_causal_relu2", "layer_causal_softmax",
                               "layer_bidir_softmax_b1", "layer_rotary_causal_relu2",
                               "layer_rotary_bidir_softmax_len_gt_maxpos", "layer_batchnorm_postnorm_bidir",
                               "layer_all_active_window_divides", "layer_compressed_len_divides_window",
                               "layer_pad_bidir_relu2", "layer_pad_causal_softmax", "layer_no_active",
                               "layer_all_active_causal", "layer_one_row_all_active_uncompressed",
                               "layer_b1_long_trunc_causal", "layer_local_pos_bidir"};
  int found = 0;
  for (const char* name : layer_cases) {
    SafeTensors st;
    if (!SafeTensors::load(golden_dir() + "/" + name + ".safetensors", st)) continue;
    ++found;
    INFO(name);
    CHECK(golden_layer_error(st, "inter.", st.config(), false) < 1e-9);
  }
  for (const char* name : {"model_bidir_bn_postnorm", "model_causal_ln_prenorm_rotary_softmax"}) {
    SafeTensors st;
    if (!SafeTensors::load(golden_dir() + "/" + name + ".safetensors", st)) continue;
    ++found;
    const auto cfg = st.config();
    for (Index l = 0; l < cfg.at("n_layers").get<Index>(); ++l) {
      INFO(name << " layer " << l);
      CHECK(golden_layer_error(st, str_cat("inter.seq_layers.", l, "."), cfg, true) < 1e-9);
    }
  }
  if (found == 0) WARN("no golden cases found in " << golden_dir() << " (set SMA_GOLDEN_DIR)");
}

// ---- errors ----

TEST_CASE("local attention rejects bad configurations and inputs, naming the problem",
          "[attention][local_attention][errors]") {
  LocalAttentionConfig cfg;
  cfg.window = 2;
  cfg.position = PositionEncoding::simple;
  cfg.max_positions = 4;
  Problem p = make_problem({3, 2}, 4, 3, cfg, 1, true);
  const auto fwd = [&](const LocalAttentionConfig& c, const ops::LocalAttentionInput<double>& in, const double* t) {
    return ops::local_attention_forward<double>(c, in, t, nullptr);
  };
  CHECK_NOTHROW(fwd(cfg, p.input(), p.table.data()));

  LocalAttentionConfig bad = cfg;
  bad.window = 0;
  CHECK_THROWS_WITH(fwd(bad, p.input(), p.table.data()), Catch::Contains("window must be >= 1, got 0"));
  CHECK_THROWS_AS(fwd(bad, p.input(), p.table.data()), ValueError);
  bad = cfg;
  bad.max_positions = 0;
  CHECK_THROWS_AS(fwd(bad, p.input(), p.table.data()), ValueError);
  CHECK_THROWS_WITH(fwd(cfg, p.input(), nullptr), Catch::Contains("bias_table is nullptr"));

  CHECK_THROWS_WITH(ops::parse_attention_activation("gelu"), Catch::Contains("'gelu'"));
  CHECK_THROWS_AS(ops::parse_attention_activation("gelu"), ValueError);
  CHECK(ops::parse_attention_activation("laplace") == AttentionActivation::laplace);
  CHECK(ops::parse_position_encoding("local_simple") == PositionEncoding::local_simple);
  CHECK_THROWS_AS(ops::parse_position_encoding("alibi"), ValueError);

  {  // offsets
    auto in = p.input();
    std::vector<Index> off{0, 4, 3};
    in.offsets = &off;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("nondecreasing"));
    std::vector<Index> off2{1, 5};
    in.offsets = &off2;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("offsets[0] must be 0"));
    std::vector<Index> off3{0, 4};
    in.offsets = &off3;
    CHECK_THROWS_AS(fwd(cfg, in, p.table.data()), ShapeError);
    std::vector<Index> off4;
    in.offsets = &off4;
    CHECK_THROWS_AS(fwd(cfg, in, p.table.data()), ShapeError);
    in.offsets = nullptr;
    CHECK_THROWS_AS(fwd(cfg, in, p.table.data()), ValueError);
  }
  {  // q, k, v shapes
    const auto base = p.input();
    Matrix<double> k5(5, 3), v4(4, 3);
    const ops::LocalAttentionInput<double> bad_k{base.q, CMatrixMap<double>(k5.data(), 5, 3), base.v, &p.offsets,
                                                 &p.pos, &p.valid};
    CHECK_THROWS_WITH(fwd(cfg, bad_k, p.table.data()), Catch::Contains("same width Z"));
    const ops::LocalAttentionInput<double> bad_v{base.q, base.k, CMatrixMap<double>(v4.data(), 4, 3), &p.offsets,
                                                 &p.pos, &p.valid};
    CHECK_THROWS_WITH(fwd(cfg, bad_v, p.table.data()), Catch::Contains("v is (4, 3)"));
    CHECK_THROWS_AS(fwd(cfg, bad_v, p.table.data()), ShapeError);
  }
  {  // positions and key_valid
    auto in = p.input();
    std::vector<std::int64_t> short_pos{0, 1};
    in.positions = &short_pos;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("positions has 2 entries"));
    std::vector<std::int64_t> neg{0, 1, -2, 0, 1};
    in.positions = &neg;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("positions[2] = -2"));
    in.positions = nullptr;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("positions is nullptr"));
    LocalAttentionConfig none = cfg;
    none.position = PositionEncoding::none;
    CHECK_NOTHROW(fwd(none, in, nullptr));  // positions unused
    in.positions = &p.pos;
    std::vector<std::uint8_t> kv{1, 1};
    in.key_valid = &kv;
    CHECK_THROWS_WITH(fwd(cfg, in, p.table.data()), Catch::Contains("key_valid has 2 entries"));
  }
  {  // rotary needs an even Z
    LocalAttentionConfig rot = cfg;
    rot.position = PositionEncoding::rotary;
    Problem odd = make_problem({3, 2}, 3, 2, rot, 1, false);
    CHECK_THROWS_WITH(fwd(rot, odd.input(), nullptr), Catch::Contains("even width Z, got 3"));
  }
  {  // backward arguments
    LocalAttentionConfig sm = cfg;
    sm.activation = AttentionActivation::softmax;
    ops::LocalAttentionSaved<double> saved;
    ops::local_attention_forward<double>(sm, p.input(), p.table.data(), &saved);
    Matrix<double> G = Matrix<double>::Ones(p.S, p.H), G2 = Matrix<double>::Ones(p.S, p.H + 1), dq, dk, dv;
    std::vector<double> db(p.table.size(), 0.0);
    CHECK_THROWS_WITH(ops::local_attention_backward<double>(sm, p.input(), p.table.data(), saved,
                                                            CMatrixMap<double>(G2.data(), p.S, p.H + 1), dq, dk, dv,
                                                            db.data()),
                      Catch::Contains("dout must be (5, 3)"));
    CHECK_THROWS_WITH(ops::local_attention_backward<double>(sm, p.input(), p.table.data(), saved,
                                                            CMatrixMap<double>(G.data(), p.S, p.H), dq, dk, dv,
                                                            nullptr),
                      Catch::Contains("dbias_table is nullptr"));
    ops::LocalAttentionSaved<double> wrong;
    wrong.row_stat.resize(2);
    CHECK_THROWS_WITH(ops::local_attention_backward<double>(sm, p.input(), p.table.data(), wrong,
                                                            CMatrixMap<double>(G.data(), p.S, p.H), dq, dk, dv,
                                                            db.data()),
                      Catch::Contains("row_stat has 2 entries"));
  }
}

TEST_CASE("bias table sizes, query scales and the rel_pos helpers", "[attention][local_attention]") {
  LocalAttentionConfig cfg;
  cfg.window = 8;
  cfg.max_positions = 64;
  CHECK(cfg.bias_table_size() == 127);
  cfg.position = PositionEncoding::local_simple;
  CHECK(cfg.bias_table_size() == 47);
  cfg.position = PositionEncoding::rotary;
  CHECK(cfg.bias_table_size() == 0);
  CHECK(cfg.query_scale(16) == Approx(1.0 / 8));
  cfg.direction = Direction::bidirectional;
  CHECK(cfg.query_scale(16) == Approx(1.0 / 16));
  cfg.activation = AttentionActivation::softmax;
  CHECK(cfg.query_scale(16) == Approx(0.25));

  // simple_bias_matrix is the reference's FastRelativePositionalBias, also beyond max_positions.
  std::vector<double> w(2 * 5 - 1);
  for (std::size_t e = 0; e < w.size(); ++e) w[e] = double(e) + 0.5;
  for (Index L : {3, 5, 9}) CHECK(ops::simple_bias_matrix(w.data(), 5, L) == reference_rel_pos(w, 5, L));

  // apply_rotary then its inverse is the identity; the angle of pair m at position p is p * theta^(-2m/Z).
  Matrix<double> x = Matrix<double>::Random(3, 4), y = x;
  const std::vector<std::int64_t> pos{0, 7, 1000};
  ops::apply_rotary(y, pos);
  CHECK(y.row(0) == x.row(0));
  const double turned = std::atan2(y(1, 1), y(1, 0)) - std::atan2(x(1, 1), x(1, 0));
  CHECK(std::remainder(turned - 7.0, 2 * M_PI) == Approx(0.0).margin(1e-12));
  ops::apply_rotary(y, pos, 10000.0, /*inverse=*/true);
  CHECK(max_abs(y - x) < 1e-12);
}
