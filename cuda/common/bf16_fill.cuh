// cuda/common/bf16_fill.cuh: clearing a contiguous bf16 range from a grid-stride loop with 16-byte stores (one
// 2-byte store per element took 33 us per layer at the training step's shape).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sma::cuda::detail {

/// Zeros dst[begin, stop) with the calling thread being number `first` of `stride` threads: the elements before the
/// first 16-byte boundary and after the last one one by one, the rest 8 at a time.
__device__ __forceinline__ void zero_bf16_range(__nv_bfloat16* dst, long long begin, long long stop, long long first,
                                                long long stride) {
  if (begin >= stop) return;
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.f);
  const auto addr = reinterpret_cast<std::uintptr_t>(dst + begin);
  const long long head = min(stop - begin, static_cast<long long>(((16 - addr % 16) % 16) / 2));
  const long long body = (stop - begin - head) / 8;
  for (long long i = first; i < head; i += stride) dst[begin + i] = zero;
  uint4* v = reinterpret_cast<uint4*>(dst + begin + head);
  for (long long i = first; i < body; i += stride) v[i] = make_uint4(0u, 0u, 0u, 0u);
  for (long long i = begin + head + 8 * body + first; i < stop; i += stride) dst[i] = zero;
}

}  // namespace sma::cuda::detail
