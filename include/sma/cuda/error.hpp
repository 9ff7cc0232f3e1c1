// sma/cuda/error.hpp: the exception every failed CUDA runtime, cuBLAS or cuFFT call of sma::cuda turns into.
// No CUDA header is included here: the error is described by the library's own name for it and its message.
#pragma once

#include <sma/core/error.hpp>

#include <string>
#include <utility>

namespace sma::cuda {

/// A CUDA runtime / cuBLAS / cuFFT call failed. what() names the call as written in the source, the library's
/// error name and description, and the file and line: "cudaMalloc(&ptr, bytes) failed: cudaErrorMemoryAllocation
/// (out of memory) at cuda/common/buffer.cu:31". Thrown by SMA_CUDA_CHECK (cuda/common/check.cuh).
class CudaError : public Error {
 public:
  CudaError(std::string call, std::string error_name, const std::string& message)
      : Error(message), call_(std::move(call)), error_name_(std::move(error_name)) {}

  /// The failing call's source text, e.g. "cudaMalloc(&ptr, bytes)".
  const std::string& call() const noexcept { return call_; }
  /// The library's name of the error code, e.g. "cudaErrorMemoryAllocation" or "CUBLAS_STATUS_NOT_INITIALIZED".
  const std::string& error_name() const noexcept { return error_name_; }

 private:
  std::string call_, error_name_;
};

}  // namespace sma::cuda
