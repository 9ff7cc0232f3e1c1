// cuda/common/site_mask.cuh: one dropout site as a kernel sees it (masks: sma/cuda/dropout.hpp), and the kernel that
// advances a draw counter, shared by the layer's and the LM's feed-forward blocks' kernels.
#pragma once

#include <sma/cuda/dropout.hpp>

#include <cstdint>

namespace sma::cuda {
namespace {

// The key is derived once per thread from the draw counter in device memory; (i) is the mask's value for the
// site's element i, 1 when the caller runs without dropout (no draw pointer).
struct SiteMask {
  std::uint64_t key = 0;
  std::uint32_t threshold = 0;
  float keep = 1.f;
  bool on = false;
  __device__ SiteMask(const DropoutArgs& a, DropoutSite site) : on(a.draw != nullptr) {
    if (on) {
      key = dropout_key(a.seed, *a.draw, site);
      threshold = a.threshold;
      keep = a.keep_scale;
    }
  }
  __device__ float operator()(long long i) const {
    return on ? dropout_scale(key, static_cast<std::uint64_t>(i), threshold, keep) : 1.f;
  }
};

__global__ void advance_draw_kernel(std::uint64_t* draw) { ++*draw; }

/// The arguments of one rate (draw null, i.e. no dropout, when p is 0).
inline DropoutArgs dropout_args(std::uint64_t seed, const std::uint64_t* draw, double p) {
  DropoutArgs a;
  if (!(p > 0)) return a;
  a.seed = seed;
  a.draw = draw;
  a.threshold = dropout_threshold(p);
  a.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return a;
}

}  // namespace
}  // namespace sma::cuda
