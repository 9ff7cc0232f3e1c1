#include <catch2/catch.hpp>
#include <sma/layers/linear.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <cmath>
#include <map>
#include <string>

using namespace sma;

namespace {

/// y[b,t,o] = sum_i x[b,t,i] W[o,i] + bias[o], straight from the definition.
template <class T>
Tensor3<T> naive_linear(const Tensor3<T>& x, const Param<T>& w, const Param<T>* bias) {
  const Index B = x.dimension(0), L = x.dimension(1), I = x.dimension(2), O = w.dim(0);
  Tensor3<T> y(B, L, O);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t)
      for (Index o = 0; o < O; ++o) {
        double s = bias ? double(bias->data()[o]) : 0.0;
        for (Index i = 0; i < I; ++i) s += double(x(b, t, i)) * double(w.data()[o * I + i]);
        y(b, t, o) = T(s);
      }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("Linear forward equals the naive loops", "[layers][linear]", float, double) {
  using T = TestType;
  for (bool bias : {true, false}) {
    Linear<T> lin({5, 3, bias}, /*seed=*/3);
    testing::randomize_params(lin, 4);
    const Tensor3<T> x = testing::random_tensor<T>(2, 4, 5, 9);
    Context ctx;
    typename Linear<T>::Cache cache;
    const Tensor3<T> y = lin.forward(ctx, x, cache);
    const Tensor3<T> want = naive_linear(x, lin.weight(), bias ? &lin.bias() : nullptr);
    REQUIRE(y.dimension(2) == 3);
    for (Index i = 0; i < y.size(); ++i) CHECK(double(y.data()[i]) == Approx(double(want.data()[i])).epsilon(1e-5));
    // The row interface gives the same numbers on the packed (B*L, in) matrix.
    const Matrix<T> yr = lin.forward_rows(as_matrix(x));
    CHECK((yr - as_matrix(y)).cwiseAbs().maxCoeff() == T(0));
  }
}

TEST_CASE("Linear names its parameters as PyTorch, in PyTorch layout", "[layers][linear]") {
  Linear<double> lin({4, 6});
  std::map<std::string, std::vector<Index>> seen;
  for_each_param(lin, [&](const std::string& name, Param<double>& p) { seen[name] = p.shape(); });
  CHECK(seen.size() == 2);
  CHECK(seen["weight"] == std::vector<Index>{6, 4});
  CHECK(seen["bias"] == std::vector<Index>{6});
  Linear<double> nob({4, 6, false});
  Index n = 0;
  for_each_param(nob, [&](const std::string& name, Param<double>&) {
    CHECK(name == "weight");
    ++n;
  });
  CHECK(n == 1);
}

TEST_CASE("Linear gradcheck, with and without bias, fixed and dynamic widths", "[layers][linear][grad]") {
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 4, 1);
  {
    Linear<double> lin({4, 5}, 1);
    testing::randomize_params(lin, 2);
    const auto r = testing::gradcheck(lin, x);
    INFO(r);
    CHECK(r.ok);
  }
  {
    Linear<double> lin({4, 5, false}, 1);
    const auto r = testing::gradcheck(lin, x);
    INFO(r);
    CHECK(r.ok);
  }
  {
    Linear<double, 4, 2> lin({4, 2}, 1);
    static_assert(Linear<double, 4, 2>::kInDim == 4 && Linear<double, 4, 2>::kOutDim == 2);
    testing::randomize_params(lin, 5);
    const auto r = testing::gradcheck(lin, x);
    INFO(r);
    CHECK(r.ok);
  }
}

TEST_CASE("Linear row functions: backward_rows accumulates, blocks bind without copies", "[layers][linear]") {
  Linear<double> lin({6, 3}, 7);
  testing::randomize_params(lin, 8);
  Tensor2<double> xs = testing::random_normal<double, 2>({10, 8}, 3);
  Tensor2<double> dys = testing::random_normal<double, 2>({10, 3}, 4);
  const Matrix<double> full = as_matrix(xs);
  const Matrix<double> dy = as_matrix(dys);
  // x is columns 1..6 of a wider row-major matrix, the way GAU splits one projection into z, r, v.
  const auto x = full.middleCols(1, 6);
  const Matrix<double> y = lin.forward_rows(x);
  const Matrix<double> xc = x;
  const Matrix<double> want_y =
      (xc * lin.weight().mat().transpose()).rowwise() + lin.bias().mat().row(0);
  CHECK((y - want_y).cwiseAbs().maxCoeff() < 1e-12);

  zero_grad(lin);
  const Matrix<double> dx = lin.backward_rows(x, dy);
  const Matrix<double> want_dx = dy * lin.weight().mat();
  const Matrix<double> want_dw = dy.transpose() * xc;
  CHECK((dx - want_dx).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((lin.weight().grad_mat() - want_dw).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((lin.bias().grad_mat().row(0) - dy.colwise().sum()).cwiseAbs().maxCoeff() < 1e-12);
  (void)lin.backward_rows(x, dy);  // accumulates: now twice the gradient
  CHECK((lin.weight().grad_mat() - 2 * want_dw).cwiseAbs().maxCoeff() < 1e-12);

  // Writing into a block of a bigger output.
  Matrix<double> out = Matrix<double>::Zero(10, 5);
  lin.forward_rows_into(x, out.middleCols(2, 3));
  CHECK((out.middleCols(2, 3) - want_y).cwiseAbs().maxCoeff() < 1e-12);
  CHECK(out.col(0).isZero());
  Matrix<double> dxo(10, 6);
  lin.backward_input_into(dy, dxo);
  CHECK((dxo - want_dx).cwiseAbs().maxCoeff() < 1e-12);

  // Empty token sets (a batch where the router activates nothing) are fine.
  const Matrix<double> none(0, 6);
  CHECK(lin.forward_rows(none).rows() == 0);
  CHECK(lin.backward_rows(none, Matrix<double>(0, 3)).rows() == 0);
}

TEST_CASE("Linear initialisation: truncated normal 0.02 with zero bias, or PyTorch's Kaiming uniform",
          "[layers][linear]") {
  Linear<double> lin({200, 100}, 42);
  const auto w = lin.weight().vec();
  CHECK(w.cwiseAbs().maxCoeff() <= 0.04);
  const double mean = w.mean();
  const double std = std::sqrt((w.array() - mean).square().mean());
  CHECK(std::abs(mean) < 1e-3);
  CHECK(std == Approx(0.0175926).epsilon(0.03));  // std of N(0, 0.02^2) truncated at 2 sigma
  CHECK(lin.bias().vec().isZero());
  Linear<double> same({200, 100}, 42), other({200, 100}, 43);
  CHECK(same.weight().vec() == lin.weight().vec());
  CHECK(other.weight().vec() != lin.weight().vec());

  lin.reset_parameters(1, LinearInit::kaiming_uniform);
  const double bound = 1.0 / std::sqrt(200.0);
  CHECK(lin.weight().vec().cwiseAbs().maxCoeff() <= bound);
  CHECK(lin.weight().vec().cwiseAbs().maxCoeff() > 0.9 * bound);
  CHECK(lin.bias().vec().cwiseAbs().maxCoeff() <= bound);
  CHECK_FALSE(lin.bias().vec().isZero());
}

TEST_CASE("Linear errors name the shapes", "[layers][linear][errors]") {
  Linear<double> lin({8, 4});
  Context ctx;
  Linear<double>::Cache cache;
  Tensor3<double> x(2, 7, 16);
  x.setZero();
  CHECK_THROWS_AS(lin.forward(ctx, x, cache), ShapeError);
  CHECK_THROWS_WITH(lin.forward(ctx, x, cache),
                    Catch::Matchers::Contains("(*, *, 8)") && Catch::Matchers::Contains("(2, 7, 16)"));
  Tensor3<double> ok(2, 7, 8);
  ok.setZero();
  (void)lin.forward(ctx, ok, cache);
  Tensor3<double> dy(2, 7, 5);
  dy.setZero();
  CHECK_THROWS_WITH(lin.backward(ctx, dy, cache),
                    Catch::Matchers::Contains("(2, 7, 4)") && Catch::Matchers::Contains("(2, 7, 5)"));
  CHECK_THROWS_WITH(lin.forward_rows(Matrix<double>(3, 5)),
                    Catch::Matchers::Contains("(*, 8)") && Catch::Matchers::Contains("(3, 5)"));
  // Compile-time widths must agree with the configuration.
  CHECK_THROWS_AS((Linear<double, 4, 2>({4, 3})), ShapeError);
  CHECK_THROWS_WITH((Linear<double, 4, 2>({5, 2})), Catch::Matchers::Contains("compile-time width is 4"));
  CHECK_THROWS_AS(Linear<double>(Linear<double>::Config{}), ValueError);  // Dynamic widths not given
  ctx.check_finite = true;
  ok(1, 2, 3) = std::nan("");
  CHECK_THROWS_AS(lin.forward(ctx, ok, cache), NumericError);
}

TEST_CASE("Linear weight gradient over many tokens (token-split threads) equals the plain product",
          "[layers][linear]") {
  const Index S = 4099, in = 32, out = 40;  // big enough for the multi-threaded split, odd to test the edges
  Linear<double> lin({in, out}, 1);
  Tensor2<double> xs = testing::random_normal<double, 2>({S, in}, 2);
  Tensor2<double> dys = testing::random_normal<double, 2>({S, out}, 3);
  const Matrix<double> x = as_matrix(xs), dy = as_matrix(dys);
  zero_grad(lin);
  lin.accumulate_param_grads(x, dy);
  lin.accumulate_param_grads(x, dy);
  const Matrix<double> want = 2 * (dy.transpose() * x);
  CHECK((lin.weight().grad_mat() - want).cwiseAbs().maxCoeff() < 1e-10);
  CHECK((lin.bias().grad_mat().row(0) - 2 * dy.colwise().sum()).cwiseAbs().maxCoeff() < 1e-10);
  // Inside an enclosing parallel region the layer stays single-threaded and still correct.
  zero_grad(lin);
#pragma omp parallel num_threads(2)
  {
#pragma omp single
    lin.accumulate_param_grads(x, dy);
  }
  CHECK((lin.weight().grad_mat() - want / 2).cwiseAbs().maxCoeff() < 1e-10);
}
