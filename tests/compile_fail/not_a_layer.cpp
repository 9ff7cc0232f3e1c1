// A type without a Cache is rejected with a message that says what to add.
// EXPECT: a layer must define a nested 'struct Cache'
#include <sma/core/layer.hpp>

struct NotALayer {
  using Scalar = double;
#ifndef SMA_SHOULD_FAIL
  struct Cache {};
#endif
  static constexpr sma::Index kInDim = sma::Dynamic, kOutDim = sma::Dynamic;
  sma::Tensor3<double> forward(sma::Context&, const sma::Tensor3<double>& x, Cache&) const { return x; }
  sma::Tensor3<double> backward(sma::Context&, const sma::Tensor3<double>& dy, const Cache&) { return dy; }
  template <class V>
  void visit_params(V&&) {}
};

static_assert(sma::check_layer<NotALayer>());

int main() { return 0; }
