// cuda/common/check.cuh: SMA_CUDA_CHECK(call) evaluates a CUDA runtime, cuBLAS or cuFFT call and throws
// sma::cuda::CudaError naming the call (its source text), the error and the place when it did not succeed.
// Kernel launches are checked with SMA_CUDA_CHECK_LAUNCH() right after the <<<...>>>.
#pragma once

#include <sma/cuda/error.hpp>

#include <cublas_api.h>
#include <cuda_runtime.h>
#include <cufft.h>

#include <string>

namespace sma::cuda::detail {

inline bool failed(cudaError_t e) { return e != cudaSuccess; }
inline bool failed(cublasStatus_t s) { return s != CUBLAS_STATUS_SUCCESS; }
inline bool failed(cufftResult r) { return r != CUFFT_SUCCESS; }

inline std::string error_name(cudaError_t e) { return cudaGetErrorName(e); }
inline std::string error_text(cudaError_t e) { return cudaGetErrorString(e); }

// cuBLAS and cuFFT have no name function in their headers (cuBLAS's lives in the library, which sma::cuda does
// not link unless it uses it), hence the tables.
inline std::string error_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_" + std::to_string(static_cast<int>(s));
  }
}
inline std::string error_text(cublasStatus_t) { return "cuBLAS call failed"; }

inline std::string error_name(cufftResult r) {
  switch (r) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA: return "CUFFT_UNALIGNED_DATA";
    case CUFFT_INVALID_DEVICE: return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE: return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED: return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    case CUFFT_MISSING_DEPENDENCY: return "CUFFT_MISSING_DEPENDENCY";
    default: return "CUFFT_RESULT_" + std::to_string(static_cast<int>(r));
  }
}
inline std::string error_text(cufftResult) { return "cuFFT call failed"; }

template <class Status>
[[noreturn]] void throw_cuda_error(Status s, const char* call, const char* file, int line) {
  // A failed runtime call also sets the runtime's "last error"; clear it (when not sticky), or the next
  // SMA_CUDA_CHECK_LAUNCH() would report this failure again as a launch failure.
  cudaGetLastError();
  const std::string name = error_name(s);
  throw CudaError(call, name,
                  str_cat(call, " failed: ", name, " (", error_text(s), ") at ", file, ":", line));
}

template <class Status>
inline void check(Status s, const char* call, const char* file, int line) {
  if (failed(s)) throw_cuda_error(s, call, file, line);
}

}  // namespace sma::cuda::detail

#define SMA_CUDA_CHECK(call) ::sma::cuda::detail::check((call), #call, __FILE__, __LINE__)

// After a <<<...>>> launch: a bad configuration (too much shared memory, a zero-sized grid) is reported here.
#define SMA_CUDA_CHECK_LAUNCH() ::sma::cuda::detail::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
