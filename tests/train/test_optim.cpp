#include <catch2/catch.hpp>
#include <sma/optim/adam.hpp>
#include <sma/optim/loss.hpp>
#include <sma/optim/sgd.hpp>

#include <cmath>

using namespace sma;

namespace {
struct Toy {
  Param<double> w{"w", {3}}, stat{"running", {2}, ParamKind::buffer};
  template <class V>
  void visit_params(V&& v) {
    v("w", w);
    v("running", stat);
  }
};
}  // namespace

TEST_CASE("AdamW matches the textbook update and skips buffers", "[train][optim]") {
  Toy m;
  m.w.data()[0] = 1.0, m.w.data()[1] = -2.0, m.w.data()[2] = 0.5;
  m.stat.fill(7.0);
  ParamBuffer<double> buf(m);
  optim::Adam<double>::Config cfg;
  cfg.weight_decay = 0.1;
  optim::Adam<double> opt(buf, cfg);
  const double g[3] = {0.3, -0.1, 2.0};
  double w[3] = {1.0, -2.0, 0.5}, mm[3] = {}, vv[3] = {};
  for (int t = 1; t <= 3; ++t) {
    for (int i = 0; i < 3; ++i) m.w.grad()[i] = g[i] * t;
    m.stat.grad()[0] = 100;  // must be ignored
    opt.step(0.01);
    for (int i = 0; i < 3; ++i) {
      const double gi = g[i] * t;
      mm[i] = 0.9 * mm[i] + 0.1 * gi;
      vv[i] = 0.999 * vv[i] + 0.001 * gi * gi;
      w[i] *= 1 - 0.01 * 0.1;
      w[i] -= 0.01 * (mm[i] / (1 - std::pow(0.9, t))) / (std::sqrt(vv[i] / (1 - std::pow(0.999, t))) + 1e-8);
    }
  }
  for (int i = 0; i < 3; ++i) CHECK(m.w.data()[i] == Approx(w[i]).epsilon(1e-12));
  CHECK(m.stat.data()[0] == 7.0);
  CHECK(opt.steps() == 3);
}

TEST_CASE("RAdam uses un-adapted momentum for the first steps, then rectifies", "[train][optim]") {
  Toy m;
  m.w.fill(1.0);
  ParamBuffer<double> buf(m);
  optim::Adam<double>::Config cfg;
  cfg.variant = optim::AdamVariant::radam;
  optim::Adam<double> opt(buf, cfg);
  // rho_t <= 5 for t <= 5 with beta2 = 0.999: w -= lr * m_hat, and m_hat = g for a constant gradient.
  for (int t = 1; t <= 5; ++t) {
    m.w.grad_vec().setConstant(0.5);
    opt.step(0.1);
  }
  CHECK(m.w.data()[0] == Approx(1.0 - 5 * 0.1 * 0.5).epsilon(1e-12));
  m.w.grad_vec().setConstant(0.5);
  opt.step(0.1);
  const double t = 6, b2 = 0.999, rho_inf = 2 / (1 - b2) - 1;
  const double rho_t = rho_inf - 2 * t * std::pow(b2, t) / (1 - std::pow(b2, t));
  REQUIRE(rho_t > 5);
  const double r = std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t));
  // Constant gradient: m_hat = 0.5 and sqrt(v_hat) = 0.5 exactly.
  CHECK(m.w.data()[0] == Approx(0.75 - 0.1 * r * 0.5 / (0.5 + 1e-8)).epsilon(1e-9));
}

TEST_CASE("SGD with momentum and Nesterov follow PyTorch's rule", "[train][optim]") {
  Toy m;
  m.w.fill(1.0);
  ParamBuffer<double> buf(m);
  optim::Sgd<double> opt(buf, {0.9, 0.0, false});
  m.w.grad_vec().setConstant(1.0);
  opt.step(0.1);  // buf = 1
  opt.step(0.1);  // buf = 1.9
  CHECK(m.w.data()[0] == Approx(1.0 - 0.1 - 0.19));
  CHECK_THROWS_AS((optim::Sgd<double>(buf, {1.5, 0.0, false})), ValueError);
}

TEST_CASE("schedules warm up linearly and decay to the floor", "[train][optim]") {
  optim::Schedule s{1.0, 10, 110, optim::Decay::cosine, 0.1};
  CHECK(s.lr(0) == Approx(0.1));
  CHECK(s.lr(9) == Approx(1.0));
  CHECK(s.lr(60) == Approx(0.1 + 0.9 * 0.5));
  CHECK(s.lr(110) == Approx(0.1));
  optim::Schedule lin{2.0, 0, 100, optim::Decay::linear, 0.0};
  CHECK(lin.lr(50) == Approx(1.0));
  CHECK_THROWS_AS(optim::parse_decay("exp"), ValueError);
}

TEST_CASE("gradient clipping scales to the global norm", "[train][optim]") {
  Toy m;
  ParamBuffer<double> buf(m);
  m.w.grad()[0] = 3, m.w.grad()[1] = 4, m.w.grad()[2] = 0;
  m.stat.grad()[0] = 1000;  // buffers do not count
  CHECK(optim::clip_grad_norm(buf, 1.0) == Approx(5.0));
  CHECK(m.w.grad_vec().norm() == Approx(1.0).epsilon(1e-5));
  CHECK(optim::clip_grad_norm(buf, 0.0) == Approx(1.0).epsilon(1e-5));
}

TEST_CASE("cross-entropy: value, accuracy, ignored rows and finite-difference gradient", "[train][loss]") {
  Matrix<double> logits(3, 4);
  logits << 0.1, 2.0, -1.0, 0.3, 1.5, 0.2, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0;
  std::vector<std::int64_t> y = {1, 2, -100};
  Matrix<double> d;
  const auto r = optim::cross_entropy<double>(cmap(logits), y, &d);
  CHECK(r.counted == 2);
  CHECK(r.correct == 1);
  const auto lse = [&](int i) { return std::log(logits.row(i).array().exp().sum()); };
  CHECK(r.loss == Approx(((lse(0) - 2.0) + (lse(1) - 0.0)) / 2));
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 4; ++c) {
      Matrix<double> lp = logits, lm = logits;
      lp(i, c) += 1e-6;
      lm(i, c) -= 1e-6;
      const double num = (optim::cross_entropy<double>(cmap(lp), y, nullptr).loss -
                          optim::cross_entropy<double>(cmap(lm), y, nullptr).loss) / 2e-6;
      CHECK(d(i, c) == Approx(num).margin(1e-8));
    }
  CHECK(d.row(2).isZero());
  y[0] = 4;
  CHECK_THROWS_WITH(optim::cross_entropy<double>(cmap(logits), y, nullptr), Catch::Matchers::Contains("label 4 at row 0"));
}
