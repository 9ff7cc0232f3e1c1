// A downstream program: defines its own layer against the public contract and checks it with sma's own tools.
// Built by tests/consumer/run_consumer.cmake from an installed sma (find_package) and from the source tree
// (add_subdirectory); it prints "consumer ok" and returns 0 when everything holds.
#include <sma/core/context.hpp>
#include <sma/core/error.hpp>
#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/testing/gradcheck.hpp>
#include <sma/testing/random.hpp>
#ifdef SMA_CONSUMER_WITH_CUDA
#include <sma/cuda/device.hpp>
#endif

#include <cstdio>
#include <string>

namespace {

/// y[b, t, d] = x[b, t, d] * weight[d]: the smallest layer with a parameter.
template <class T>
class ChannelScale {
 public:
  using Scalar = T;
  static constexpr sma::Index kInDim = sma::Dynamic, kOutDim = sma::Dynamic;
  struct Cache {
    sma::Tensor3<T> x;
  };

  explicit ChannelScale(sma::Index dim) : weight_("weight", {dim}) { weight_.fill(T(1)); }

  sma::Tensor3<T> forward(sma::Context&, const sma::Tensor3<T>& x, Cache& cache) const {
    sma::check_shape(x, {-1, -1, weight_.size()}, "ChannelScale::forward: x");
    cache.x = x;
    auto y = sma::uninitialized<T, 3>({x.dimension(0), x.dimension(1), x.dimension(2)});
    sma::as_matrix(y) = sma::as_matrix(x) * weight_.vec().asDiagonal();
    return y;
  }

  sma::Tensor3<T> backward(sma::Context&, const sma::Tensor3<T>& dy, const Cache& cache) {
    auto dx = sma::uninitialized<T, 3>({dy.dimension(0), dy.dimension(1), dy.dimension(2)});
    sma::as_matrix(dx) = sma::as_matrix(dy) * weight_.vec().asDiagonal();
    weight_.grad_vec() += sma::as_matrix(dy).cwiseProduct(sma::as_matrix(cache.x)).colwise().sum().transpose();
    return dx;
  }

  template <class V>
  void visit_params(V&& v) {
    v("weight", weight_);
  }

 private:
  sma::Param<T> weight_;
};

static_assert(sma::check_layer<ChannelScale<float>>());
static_assert(sma::is_layer_v<ChannelScale<double>>);

int fail(const std::string& what) {
  std::fprintf(stderr, "consumer FAILED: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main() {
  ChannelScale<double> layer(4);
  sma::testing::randomize_params(layer, /*seed=*/3);
  sma::ParamBuffer<double> buffer(layer);
  if (buffer.size() != 4) return fail("ParamBuffer size");

  const auto x = sma::testing::random_tensor<double>(2, 5, 4, /*seed=*/1);  // (B, L, D)
  const auto r = sma::testing::gradcheck(layer, x);
  if (!r.ok) return fail(r.message);

  sma::Context ctx(sma::Mode::eval);
  ChannelScale<double>::Cache cache;
  try {
    (void)layer.forward(ctx, sma::testing::random_tensor<double>(2, 5, 3, 2), cache);
    return fail("a (2, 5, 3) input to a width-4 layer was accepted");
  } catch (const sma::ShapeError& e) {
    if (std::string(e.what()).find("(2, 5, 3)") == std::string::npos) return fail(std::string("message: ") + e.what());
  }

#ifdef SMA_CONSUMER_WITH_CUDA
  std::printf("CUDA devices: %d\n", sma::cuda::device_count());
#endif
  std::printf("consumer ok (sma %s, %s)\n", SMA_VERSION_STRING, r.message.c_str());
  return 0;
}
