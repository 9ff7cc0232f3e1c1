// Chaining layers whose fixed widths disagree fails with one line naming the rule; the instantiation
// assert_widths_match<8, 16, 0> beside it gives the numbers and the position.
// EXPECT: kOutDim of layer
#include <sma/compose/seq.hpp>
#include <sma/layers/linear.hpp>

#ifdef SMA_SHOULD_FAIL
using Net = sma::Seq<sma::Linear<double, 4, 8>, sma::Linear<double, 16, 2>>;
#else
using Net = sma::Seq<sma::Linear<double, 4, 8>, sma::Linear<double, 8, 2>>;
#endif

static_assert(Net::kInDim == 4);

int main() {
  Net net;
  return static_cast<int>(Net::kOutDim) == 2 ? 0 : 1;
}
