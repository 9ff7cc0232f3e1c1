// cuda/local_attention/rotary.cuh: the rotary arithmetic shared by the attention's kernels and by callers that
// write the bf16 path's padded operands themselves (SeqBoatLayerDevice): the frequency table and the rotation of a
// column pair. Both sides must round the same way, bit for bit, so they share these functions rather than copies.
#pragma once

#include <cuda_runtime.h>

namespace sma::cuda::attn {

namespace {

/// Rotary frequencies 1 / theta^(2m/z), m < z/2, in double: the first thing each rotary CTA does (one pow per
/// column and CTA rather than per element; the values are the same as computed per element).
__device__ __forceinline__ void rotary_frequencies(double* inv, int z, double theta) {
  for (int m = threadIdx.x; m < z / 2; m += blockDim.x)
    inv[m] = 1.0 / pow(theta, static_cast<double>(2 * m) / static_cast<double>(z));
  __syncthreads();
}

/// cos and sin of the angle sign * pos * inv. kPrecise: in double (the fp32 path). Otherwise (the bf16 path, whose
/// operands carry 8 bits) the angle is reduced modulo 2 pi in double and sincosf takes the rest: about 1e-7
/// relative, far below bf16's rounding, at a fraction of double sincos's cost.
template <bool kPrecise>
__device__ __forceinline__ void rotary_angle(double angle, double& cs, double& sn) {
  if constexpr (kPrecise) {
    sincos(angle, &sn, &cs);
  } else {
    constexpr double kTwoPi = 6.283185307179586476925;
    const float r = static_cast<float>(angle - rint(angle * (1.0 / kTwoPi)) * kTwoPi);
    float s, c;
    sincosf(r, &s, &c);
    sn = s;
    cs = c;
  }
}

/// The bf16 path's rotation of the column pair (x0, x1) by `angle` (position times frequency): rotary_angle<false>,
/// the products in double, rounded back to float (the caller then rounds to bf16).
__device__ __forceinline__ void rotate_pair_bf16_path(float& x0, float& x1, double angle) {
  double sn, cs;
  rotary_angle<false>(angle, cs, sn);
  const double a = x0, b = x1;
  x0 = static_cast<float>(a * cs - b * sn);
  x1 = static_cast<float>(a * sn + b * cs);
}

}  // namespace

}  // namespace sma::cuda::attn
