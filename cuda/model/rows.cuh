// cuda/model/rows.cuh: row-broadcast passes the device models share: a bias (plus a residual) written under every
// row before a product adds into it, and zeroing the rows of padded tokens.
#pragma once

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace sma::cuda::detail {
namespace {

// residual may alias out (no __restrict__ on either).
__global__ void bias_rows_kernel(long long n, int cols, const float* __restrict__ bias, const float* residual,
                                 float* out) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = bias[i % cols] + (residual ? residual[i] : 0.f);
}

__global__ void zero_padded_rows_kernel(long long n, int cols, const std::uint8_t* __restrict__ pad,
                                        float* __restrict__ x) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    if (pad[i / cols]) x[i] = 0.f;
}

}  // namespace

/// out (rows, cols) = bias (cols) under every row, plus residual (rows, cols) when not null (may alias out).
inline void bias_rows(long long rows, int cols, const float* bias, const float* residual, float* out,
                      cudaStream_t s) {
  const long long n = rows * cols;
  if (n <= 0) return;
  bias_rows_kernel<<<grid_for(n, 256), 256, 0, s>>>(n, cols, bias, residual, out);
  SMA_CUDA_CHECK_LAUNCH();
}

/// x (rows, cols): the rows with pad[r] != 0 set to 0 (nothing when pad is null).
inline void zero_padded_rows(long long rows, int cols, const std::uint8_t* pad, float* x, cudaStream_t s) {
  const long long n = rows * cols;
  if (!pad || n <= 0) return;
  zero_padded_rows_kernel<<<grid_for(n, 256), 256, 0, s>>>(n, cols, pad, x);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace sma::cuda::detail
