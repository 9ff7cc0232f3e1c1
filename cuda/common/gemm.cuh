// cuda/common/gemm.cuh: row-major fp32 products through cuBLAS, which is column-major: the layer and the model
// store activations and weights row-major (as the CPU code does), so C = op(A) op(B) is computed as
// C^T = op(B)^T op(A)^T with the operands swapped.
#pragma once

#include "check.cuh"

#include <cublas_v2.h>

namespace sma::cuda::detail {

/// Row-major C (M x N) = op(A) op(B) + beta C (alpha 1). Empty products leave C as it is (or scaled by beta when
/// K is 0).
inline void gemm_rm(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B,
                    int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0 || (K <= 0 && beta == 1.f)) return;
  const float alpha = 1.f;
  SMA_CUDA_CHECK(cublasSgemm(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, ldb,
                             A, lda, &beta, C, ldc));
}

}  // namespace sma::cuda::detail
