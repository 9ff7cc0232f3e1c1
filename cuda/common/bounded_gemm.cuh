// cuda/common/bounded_gemm.cuh: device-side companions of sma::cuda::bounded_gemm (include/sma/cuda/bounded_gemm.hpp,
// defined in bounded_gemm.cu) for kernels that prepare or consume the operands of bounded products: they must
// know which rows the running chunks touch, so that they too can skip the rest.
#pragma once

#include <sma/cuda/bounded_gemm.hpp>

#include "check.cuh"

#include <cuda_runtime.h>

namespace sma::cuda::detail {

/// The rows [0, bound) that the running chunks of a product bounded by S cover, chunks of `chunk_rows` rows over
/// `n` rows in all: S rounded up to a chunk, at most n. chunk_rows <= 0 means unbounded (full mode): n.
__host__ __device__ __forceinline__ long long bounded_rows(long long S, long long chunk_rows, long long n) {
  if (chunk_rows <= 0) return n;
  const long long r = (S + chunk_rows - 1) / chunk_rows * chunk_rows;
  return r < n ? (r > 0 ? r : 0) : n;
}

inline void bounded_gemm(const BoundedGemm* products, int n, const int* count, cudaStream_t s) {
  ::sma::cuda::bounded_gemm(products, n, count, static_cast<void*>(s));
}

}  // namespace sma::cuda::detail
