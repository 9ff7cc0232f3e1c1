// Tests of sma/io/xtensor.hpp: adaptors both ways, the zero-copy view, and .npy files shared with xtensor.
// Compiled only with SMA_WITH_XTENSOR (the CMake option of the same name); otherwise this file is empty.
#ifdef SMA_WITH_XTENSOR

#include <catch2/catch.hpp>
#include <sma/io/xtensor.hpp>
#include <sma/testing/temp_dir.hpp>

#include <xtensor/xnpy.hpp>
#include <xtensor/xview.hpp>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

using namespace sma;
using namespace sma::io;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

template <class T>
Tensor3<T> iota3(Index a, Index b, Index c) {
  Tensor3<T> t(a, b, c);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(3 * i - 7);
  return t;
}

}  // namespace

TEST_CASE("sma tensors copy to and from xtensor, and a view shares memory", "[io][xtensor]") {
  Tensor3<double> t = iota3<double>(2, 3, 4);

  const xt::xtensor<double, 3> xt3 = to_xtensor(t);
  REQUIRE(xt3.shape()[0] == 2);
  REQUIRE(xt3.shape()[2] == 4);
  CHECK(xt3(1, 2, 3) == t(1, 2, 3));
  CHECK(xt3(0, 1, 0) == t(0, 1, 0));
  const xt::xarray<double> xa = to_xarray(t);
  CHECK(xa.dimension() == 3);
  CHECK(xa(1, 0, 2) == t(1, 0, 2));

  auto v = xview(t);  // zero copy
  CHECK(v.data() == t.data());
  v(1, 1, 1) = 100.0;
  CHECK(t(1, 1, 1) == 100.0);
  CHECK(xt3(1, 1, 1) != 100.0);  // the copies are independent
  const Tensor3<double>& ct = t;
  CHECK(xview(ct)(1, 1, 1) == 100.0);

  const Tensor3<double> back = from_xtensor<3>(xt3);
  for (Index i = 0; i < 2; ++i)
    for (Index j = 0; j < 3; ++j)
      for (Index k = 0; k < 4; ++k) CHECK(back(i, j, k) == xt3(i, j, k));

  // Any layout and lazy expressions: a column-major array, a transposed view, an arithmetic expression.
  xt::xarray<float, xt::layout_type::column_major> cm = {{1.f, 2.f, 3.f}, {4.f, 5.f, 6.f}};
  const Tensor2<float> from_cm = from_xtensor<2>(cm);
  CHECK(from_cm(0, 2) == 3.f);
  CHECK(from_cm(1, 0) == 4.f);
  const Tensor2<float> transposed = from_xtensor<2>(xt::transpose(cm));
  CHECK(transposed.dimension(0) == 3);
  CHECK(transposed(2, 1) == 6.f);
  const Tensor2<float> lazy = from_xtensor<2>(cm * 2.f + 1.f);
  CHECK(lazy(1, 2) == 13.f);
  CHECK_THROWS_AS(from_xtensor<3>(cm), ShapeError);
  CHECK_THROWS_WITH(from_xtensor<3>(cm), Contains("expected rank 3, got shape (2, 3)"));
}

TEMPLATE_TEST_CASE("npy files written by sma and by xtensor read back in the other", "[io][xtensor][npy]", double,
                   float, std::int64_t, std::int32_t, std::uint8_t) {
  testing::TempDir dir("sma_xt_test");
  const Tensor3<TestType> t = iota3<TestType>(2, 3, 5);

  // sma writes, xtensor reads.
  const std::string ours = dir.file("ours.npy");
  save_npy(ours, t);
  const auto loaded = xt::load_npy<TestType>(ours);
  REQUIRE(loaded.dimension() == 3);
  CHECK(loaded.shape()[1] == 3);
  for (Index i = 0; i < 2; ++i)
    for (Index j = 0; j < 3; ++j)
      for (Index k = 0; k < 5; ++k) CHECK(loaded(i, j, k) == t(i, j, k));

  // xtensor writes, sma reads.
  const std::string theirs = dir.file("theirs.npy");
  xt::dump_npy(theirs, to_xarray(t));
  const Tensor3<TestType> back = load_npy<TestType, 3>(theirs);
  CHECK(std::equal(back.data(), back.data() + back.size(), t.data()));
  CHECK(read_file_bytes(theirs) == read_file_bytes(ours));  // the same bytes: both follow NumPy's layout

  // xtensor's column-major arrays are stored with fortran_order True; sma reorders them.
  xt::xarray<TestType, xt::layout_type::column_major> cm = to_xarray(t);
  const std::string fortran = dir.file("fortran.npy");
  xt::dump_npy(fortran, cm);
  const Tensor3<TestType> from_fortran = load_npy<TestType, 3>(fortran);
  CHECK(std::equal(from_fortran.data(), from_fortran.data() + from_fortran.size(), t.data()));

  // The xtensor-side helpers: saving an expression, loading into an xarray.
  const std::string expr = dir.file("expr.npy");
  save_npy(expr, xt::view(to_xarray(t), 1, xt::all(), xt::all()));
  const auto slice = load_npy_xarray<TestType>(expr);
  REQUIRE(slice.dimension() == 2);
  CHECK(slice(2, 4) == t(1, 2, 4));
  CHECK(xt::load_npy<TestType>(expr)(0, 1) == t(1, 0, 1));
}

TEST_CASE("xtensor reads sma's 1-D and scalar .npy files", "[io][xtensor][npy]") {
  testing::TempDir dir("sma_xt_test");
  Tensor1<double> v(4);
  v.setValues({1.0, -2.0, 0.5, 8.0});
  save_npy(dir.file("v.npy"), v);
  const auto xv = xt::load_npy<double>(dir.file("v.npy"));
  REQUIRE(xv.dimension() == 1);
  CHECK(xv(3) == 8.0);
  Tensor<double, 0> s;
  s() = 7.5;
  save_npy(dir.file("s.npy"), s);
  const auto xs = xt::load_npy<double>(dir.file("s.npy"));
  CHECK(xs.dimension() == 0);
  CHECK(xs() == 7.5);
}

#endif  // SMA_WITH_XTENSOR
