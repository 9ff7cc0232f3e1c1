#include <catch2/catch.hpp>
#include <sma/core/layer.hpp>
#include <sma/testing/random.hpp>

using namespace sma;

namespace {
struct Two {
  Param<double> a{"a", {2, 3}}, b{"b", {4}, ParamKind::buffer};
  template <class V>
  void visit_params(V&& v) {
    v("a", a);
    v("b", b);
  }
};
}  // namespace

TEST_CASE("Param owns storage, deep-copies, and rebinds into a ParamBuffer", "[core][param]") {
  Two m;
  m.a.fill(1.5);
  Param<double> copy = m.a;
  copy.data()[0] = 7;
  CHECK(m.a.data()[0] == 1.5);
  CHECK(m.a.mat().rows() == 2);
  CHECK(m.a.mat().cols() == 3);
  ParamBuffer<double> buf(m);
  REQUIRE(buf.size() == 10);
  CHECK(buf.values()[0] == 1.5);
  CHECK(m.a.data() == buf.values());
  CHECK(m.b.data() == buf.values() + 6);
  CHECK(buf.find("b") == &m.b);
  CHECK(count_params(m) == 6);
  buf.grads()[1] = 3;
  CHECK(m.a.grad()[1] == 3);
  zero_grad(m);
  CHECK(buf.grads()[1] == 0);
  CHECK_THROWS_AS((Param<float>{"neg", {-1}}), ShapeError);
}

TEST_CASE("check_shape names the argument and both shapes", "[core][errors]") {
  Tensor3<float> t(2, 7, 8);
  CHECK_NOTHROW(check_shape(t, {2, -1, 8}, "x"));
  try {
    check_shape(t, {2, 7, 16}, "SeqBoatLayer::forward: x");
    FAIL("no throw");
  } catch (const ShapeError& e) {
    CHECK(std::string(e.what()) == "SeqBoatLayer::forward: x: expected shape (2, 7, 16), got (2, 7, 8)");
  }
  t.setConstant(1.f);
  t(1, 2, 3) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(check_finite(t, "x"), Catch::Matchers::Contains("flat index 75"));
}

TEST_CASE("Context validates the padding mask shape", "[core][context]") {
  Context ctx(Mode::train, 7);
  Mask m = testing::padding_from_lengths({3, 1}, 4);
  ctx.padding = &m;
  CHECK(ctx.padding_for(2, 4, "layer") == &m);
  CHECK_THROWS_AS(ctx.padding_for(2, 5, "layer"), ShapeError);
  CHECK(is_padding(&m, 1, 1));
  CHECK_FALSE(is_padding(&m, 0, 2));
  CHECK_FALSE(is_padding(nullptr, 0, 2));
}
