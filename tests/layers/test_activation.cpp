#include <catch2/catch.hpp>
#include <sma/layers/activation.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>

#include <cmath>

using namespace sma;

TEST_CASE("activation scalars match known values and finite differences", "[layers][activation]") {
  CHECK(silu(1.0) == Approx(0.7310585786300049));
  CHECK(silu(-2.0) == Approx(-0.2384058440442351));
  CHECK(gelu(1.0) == Approx(0.8413447460685429));   // x * Phi(x), erf form
  CHECK(gelu(-1.0) == Approx(-0.15865525393145707));
  CHECK(relu(-0.5) == 0.0);
  CHECK(relu2(3.0) == 9.0);
  CHECK(relu2(-3.0) == 0.0);
  CHECK(relu_grad(0.0) == 0.0);  // PyTorch's subgradient at the kink
  for (Activation a : {Activation::silu, Activation::gelu, Activation::relu, Activation::relu2, Activation::identity}) {
    for (double x : {-3.1, -0.7, 0.3, 1.9, 5.2}) {
      const double h = 1e-6;
      const double fd = (activate(a, x + h) - activate(a, x - h)) / (2 * h);
      INFO(to_string(a) << " at " << x);
      CHECK(activate_grad(a, x) == Approx(fd).epsilon(1e-7).margin(1e-9));
    }
  }
}

TEST_CASE("parse_activation accepts the fairseq names and rejects others", "[layers][activation]") {
  CHECK(parse_activation("silu") == Activation::silu);
  CHECK(parse_activation("swish") == Activation::silu);
  CHECK(parse_activation("gelu") == Activation::gelu);
  CHECK(parse_activation("relu") == Activation::relu);
  CHECK(parse_activation("relu2") == Activation::relu2);
  CHECK(parse_activation("linear") == Activation::identity);
  CHECK_THROWS_AS(parse_activation("tanhh"), ValueError);
  CHECK_THROWS_WITH(parse_activation("tanhh"), Catch::Matchers::Contains("'tanhh'"));
}

TEMPLATE_TEST_CASE("matrix helpers equal the scalar functions, also on blocks", "[layers][activation]", float,
                   double) {
  using T = TestType;
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;
  // Big enough to take the parallel row-chunk path as well.
  for (Index rows : {Index(5), Index(700)}) {
    const Index cols = 130;
    Tensor2<T> src = testing::random_normal<T, 2>({rows, cols}, 7, T(0), T(3));
    const Matrix<T> x = as_matrix(src);
    for (Activation a : {Activation::silu, Activation::gelu, Activation::relu, Activation::relu2}) {
      INFO(to_string(a) << " rows " << rows);
      Matrix<T> y = x;
      activation_inplace(a, y);
      const Matrix<T> y2 = activation_forward(a, x);
      const Matrix<T> g = Matrix<T>::Constant(rows, cols, T(0.5));
      const Matrix<T> dx = activation_backward(a, x, g);
      double err_y = 0, err_y2 = 0, err_dx = 0;
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) {
          const double want = activate<double>(a, double(x(i, j)));
          const double want_d = 0.5 * activate_grad<double>(a, double(x(i, j)));
          err_y = std::max(err_y, std::abs(double(y(i, j)) - want) / (1 + std::abs(want)));
          err_y2 = std::max(err_y2, std::abs(double(y2(i, j)) - want) / (1 + std::abs(want)));
          err_dx = std::max(err_dx, std::abs(double(dx(i, j)) - want_d) / (1 + std::abs(want_d)));
        }
      CHECK(err_y < tol);
      CHECK(err_y2 < tol);
      CHECK(err_dx < tol);
    }
    // A column block of a row-major matrix (like the z/r/v split of a projection): only the block changes.
    Matrix<T> z = x;
    silu_inplace(z.middleCols(10, 20));
    CHECK(z(rows - 1, 9) == x(rows - 1, 9));
    CHECK(z(rows - 1, 30) == x(rows - 1, 30));
    CHECK(double(z(rows - 1, 10)) == Approx(silu(double(x(rows - 1, 10)))).epsilon(1e-5));
    Matrix<T> gz = Matrix<T>::Ones(rows, 20);
    silu_backward_inplace(x.middleCols(10, 20), gz);
    CHECK(double(gz(0, 0)) == Approx(silu_grad(double(x(0, 10)))).epsilon(1e-5));
    // A map over a tensor.
    Tensor3<T> t = testing::random_tensor<T>(2, 3, 4, 3);
    const Tensor3<T> t0 = t;
    silu_inplace(as_matrix(t));
    CHECK(double(t(1, 2, 3)) == Approx(silu(double(t0(1, 2, 3)))).epsilon(1e-5));
  }
  Matrix<T> a(2, 3), b(3, 2);
  CHECK_THROWS_AS(activation_backward(Activation::silu, a, b), ShapeError);
}

TEST_CASE("silu does not overflow for large |x|", "[layers][activation]") {
  Matrix<float> x(1, 4);
  x << -200.f, -90.f, 90.f, 200.f;
  silu_inplace(x);
  CHECK(x(0, 0) == Approx(0.f).margin(1e-30));
  CHECK(std::isfinite(x(0, 1)));
  CHECK(x(0, 2) == 90.f);
  CHECK(x(0, 3) == 200.f);
}

TEMPLATE_TEST_CASE("elementwise layers: forward, gradcheck, shape errors", "[layers][activation][grad]",
                   (Silu<double>), (Gelu<double>), (Relu2<double>), (Silu<double, 5>)) {
  static_assert(check_layer<TestType>());
  TestType layer;
  const Tensor3<double> x = testing::random_tensor<double>(2, 3, 5, 11);
  Context ctx;
  typename TestType::Cache cache;
  const Tensor3<double> y = layer.forward(ctx, x, cache);
  for (Index i = 0; i < x.size(); ++i) CHECK(y.data()[i] == Approx(activate(TestType::kActivation, x.data()[i])));
  const auto r = testing::gradcheck(layer, x);
  INFO(r);
  CHECK(r.ok);
  Tensor3<double> bad(2, 3, 4);
  bad.setZero();
  if (TestType::kInDim != Dynamic) CHECK_THROWS_AS(layer.forward(ctx, bad, cache), ShapeError);
  (void)layer.forward(ctx, x, cache);
  CHECK_THROWS_AS(layer.backward(ctx, bad, cache), ShapeError);
}

TEST_CASE("matrix overloads silu(x), gelu(x), relu(x), relu2(x), sigmoid(x) return fresh matrices",
          "[layers][activation]") {
  Tensor3<double> t = testing::random_tensor<double>(2, 3, 4, 21, 2.0);
  const CMatrixMap<double> x = as_matrix(static_cast<const Tensor3<double>&>(t));
  const Matrix<double> s = silu(x), g = gelu(x), r = relu(x), r2 = relu2(x), sg = sigmoid(x);
  const Matrix<double> blk = silu(x.middleCols(1, 2));  // blocks work too
  REQUIRE(blk.cols() == 2);
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) {
      CHECK(s(i, j) == Approx(silu(x(i, j))));
      CHECK(g(i, j) == Approx(gelu(x(i, j))));
      CHECK(r(i, j) == relu(x(i, j)));
      CHECK(r2(i, j) == Approx(relu2(x(i, j))));
      CHECK(sg(i, j) == Approx(sigmoid(x(i, j))));
    }
  CHECK(blk(5, 1) == Approx(silu(x(5, 2))));
  // The in-place matrix form writes through a map into the tensor.
  as_matrix(t) = silu(as_matrix(t));
  CHECK(t(1, 2, 3) == Approx(s(5, 3)));
}
