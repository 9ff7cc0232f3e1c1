#include <catch2/catch.hpp>
#include <sma/layers/dropout.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <cmath>

using namespace sma;

TEST_CASE("Dropout is the identity in eval mode and for p = 0, without touching the rng", "[layers][dropout]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 1);
  Dropout<double> drop(0.5);
  Dropout<double>::Cache cache;
  Context eval(Mode::eval, 9);
  const auto rng_before = eval.rng;
  const Tensor3<double> y = drop.forward(eval, x, cache);
  CHECK(eval.rng == rng_before);
  CHECK(cache.mask.size() == 0);
  for (Index i = 0; i < x.size(); ++i) CHECK(y.data()[i] == x.data()[i]);
  const Tensor3<double> dx = drop.backward(eval, x, cache);
  for (Index i = 0; i < x.size(); ++i) CHECK(dx.data()[i] == x.data()[i]);

  Dropout<double> none(0.0);
  Context train(Mode::train, 9);
  const Tensor3<double> y0 = none.forward(train, x, cache);
  CHECK(train.rng == rng_before);
  for (Index i = 0; i < x.size(); ++i) CHECK(y0.data()[i] == x.data()[i]);
}

TEST_CASE("Dropout in train mode: rate, scaling, determinism, backward", "[layers][dropout]") {
  const double p = 0.3;
  const Index B = 4, L = 50, D = 100;  // 20000 draws
  Tensor3<float> x(B, L, D);
  x.setConstant(2.f);
  Dropout<float> drop(p);
  Dropout<float>::Cache c1, c2, c3;
  Context a(Mode::train, 123), b(Mode::train, 123), c(Mode::train, 124);
  const Tensor3<float> y1 = drop.forward(a, x, c1);
  const Tensor3<float> y2 = drop.forward(b, x, c2);
  const Tensor3<float> y3 = drop.forward(c, x, c3);
  Index zeros = 0, diff = 0;
  for (Index i = 0; i < x.size(); ++i) {
    const float v = y1.data()[i];
    if (v == 0.f)
      ++zeros;
    else
      CHECK(v == Approx(2.0 / (1 - p)));
    CHECK(v == y2.data()[i]);  // same seed, same mask
    diff += v != y3.data()[i];
  }
  const double rate = double(zeros) / double(x.size());
  // 20000 Bernoulli(0.3) draws: the standard deviation of the rate is 0.0032.
  CHECK(rate == Approx(p).margin(0.015));
  CHECK(diff > 1000);  // another seed, another mask
  // The mean is preserved in expectation.
  double mean = 0;
  for (Index i = 0; i < x.size(); ++i) mean += y1.data()[i] / double(x.size());
  CHECK(mean == Approx(2.0).margin(0.05));
  // Backward applies the same mask.
  Tensor3<float> dy(B, L, D);
  dy.setConstant(1.f);
  const Tensor3<float> dx = drop.backward(a, dy, c1);
  for (Index i = 0; i < x.size(); ++i) CHECK(dx.data()[i] == y1.data()[i] / 2.f);
  // Successive calls on one Context draw fresh masks.
  Dropout<float>::Cache c4;
  const Tensor3<float> y4 = drop.forward(a, x, c4);
  Index same = 0;
  for (Index i = 0; i < x.size(); ++i) same += y4.data()[i] == y1.data()[i];
  CHECK(same < x.size());
}

TEST_CASE("Dropout with p = 1 drops everything; bad rates are rejected", "[layers][dropout][errors]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 1);
  Dropout<double> all(1.0);
  Dropout<double>::Cache cache;
  Context train(Mode::train, 1);
  const Tensor3<double> y = all.forward(train, x, cache);
  for (Index i = 0; i < y.size(); ++i) CHECK(y.data()[i] == 0.0);
  CHECK_THROWS_AS(Dropout<double>(-0.1), ValueError);
  CHECK_THROWS_WITH(Dropout<double>(1.5), Catch::Matchers::Contains("1.5"));
  Tensor3<double> bad(2, 3, 5);
  bad.setZero();
  (void)all.forward(train, x, cache);
  CHECK_THROWS_AS(all.backward(train, bad, cache), ShapeError);
}

TEST_CASE("Dropout gradcheck in train mode (fixed seed per forward) and eval mode", "[layers][dropout][grad]") {
  Dropout<double> drop(0.4);
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 5);
  for (Mode m : {Mode::train, Mode::eval}) {
    testing::GradcheckOptions opt;
    opt.mode = m;
    const auto r = testing::gradcheck(drop, x, opt);
    INFO(to_string(m) << ": " << r);
    CHECK(r.ok);
  }
}

TEST_CASE("Matrix dropout helpers: saved mask, identity when empty, blocks", "[layers][dropout]") {
  Context train(Mode::train, 77);
  Matrix<double> m = Matrix<double>::Constant(30, 40, 1.0);
  Matrix<double> mask;
  dropout_inplace(train, 0.25, m.middleCols(5, 20), mask);
  REQUIRE(mask.rows() == 30);
  REQUIRE(mask.cols() == 20);
  CHECK(m.leftCols(5).isOnes());
  CHECK((m.middleCols(5, 20).array() == mask.array()).all());
  const Index kept = (mask.array() > 0).count();
  CHECK(kept > 300);
  CHECK(kept < 600);
  CHECK(mask.maxCoeff() == Approx(1.0 / 0.75));
  Matrix<double> g = Matrix<double>::Constant(30, 20, 3.0);
  dropout_backward_inplace(mask, g);
  CHECK((g.array() == 3.0 * mask.array()).all());

  Context eval(Mode::eval, 77);
  Matrix<double> e = Matrix<double>::Constant(3, 4, 1.0);
  dropout_inplace(eval, 0.5, e, mask);
  CHECK(mask.size() == 0);
  CHECK(e.isOnes());
  Matrix<double> ge = Matrix<double>::Constant(3, 4, 2.0);
  dropout_backward_inplace(mask, ge);
  CHECK((ge.array() == 2.0).all());

  // make_dropout_mask is reproducible from the rng state alone.
  std::mt19937_64 r1(5), r2(5);
  Matrix<float> m1, m2;
  make_dropout_mask(m1, 7, 9, 0.5, r1);
  make_dropout_mask(m2, 7, 9, 0.5, r2);
  CHECK(m1 == m2);
  Matrix<double> wrong(2, 2);
  Matrix<double> mk = Matrix<double>::Ones(3, 3);
  CHECK_THROWS_AS(dropout_backward_inplace(mk, wrong), ShapeError);
}
