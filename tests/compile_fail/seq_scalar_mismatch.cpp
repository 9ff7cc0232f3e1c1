// Chaining a float layer after a double layer fails with one line naming the rule.
// EXPECT: same Scalar type
#include <sma/compose/seq.hpp>
#include <sma/layers/linear.hpp>

#ifdef SMA_SHOULD_FAIL
using Net = sma::Seq<sma::Linear<double, 4, 8>, sma::Linear<float, 8, 2>>;
#else
using Net = sma::Seq<sma::Linear<double, 4, 8>, sma::Linear<double, 8, 2>>;
#endif

static_assert(Net::kOutDim == 2);

int main() {
  Net net;
  return 0;
}
