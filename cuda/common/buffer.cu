// RAII device memory, streams and event timers (include/sma/cuda/buffer.hpp).
#include <sma/cuda/buffer.hpp>

#include "check.cuh"

#include <cuda_runtime.h>

namespace sma::cuda {

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes > 0) SMA_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}

DeviceBuffer::~DeviceBuffer() { release(); }

void DeviceBuffer::release() noexcept {
  if (ptr_) cudaFree(ptr_);  // a destructor must not throw; a failing free leaves the error for the next check
  ptr_ = nullptr;
  bytes_ = 0;
}

void DeviceBuffer::upload(const void* src, std::size_t bytes, void* stream) {
  if (bytes > bytes_)
    throw ShapeError(str_cat("DeviceBuffer::upload: ", bytes, " bytes into a buffer of ", bytes_));
  if (bytes == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  SMA_CUDA_CHECK(cudaMemcpyAsync(ptr_, src, bytes, cudaMemcpyHostToDevice, s));
  SMA_CUDA_CHECK(cudaStreamSynchronize(s));
}

void DeviceBuffer::download(void* dst, std::size_t bytes, void* stream) const {
  if (bytes > bytes_)
    throw ShapeError(str_cat("DeviceBuffer::download: ", bytes, " bytes from a buffer of ", bytes_));
  if (bytes == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  SMA_CUDA_CHECK(cudaMemcpyAsync(dst, ptr_, bytes, cudaMemcpyDeviceToHost, s));
  SMA_CUDA_CHECK(cudaStreamSynchronize(s));
}

void DeviceBuffer::fill_bytes(int value, void* stream) {
  if (bytes_ == 0) return;
  SMA_CUDA_CHECK(cudaMemsetAsync(ptr_, value, bytes_, static_cast<cudaStream_t>(stream)));
}

Stream::Stream() {
  cudaStream_t s = nullptr;
  SMA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  s_ = s;
}

Stream::~Stream() { release(); }

void Stream::release() noexcept {
  if (s_) cudaStreamDestroy(static_cast<cudaStream_t>(s_));
  s_ = nullptr;
}

void Stream::synchronize() const { SMA_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s_))); }

void device_synchronize() { SMA_CUDA_CHECK(cudaDeviceSynchronize()); }

EventTimer::EventTimer() {
  cudaEvent_t a = nullptr, b = nullptr;
  SMA_CUDA_CHECK(cudaEventCreate(&a));
  const cudaError_t e = cudaEventCreate(&b);
  if (e != cudaSuccess) cudaEventDestroy(a);
  SMA_CUDA_CHECK(e);
  start_ = a;
  stop_ = b;
}

EventTimer::~EventTimer() {
  if (start_) cudaEventDestroy(static_cast<cudaEvent_t>(start_));
  if (stop_) cudaEventDestroy(static_cast<cudaEvent_t>(stop_));
}

void EventTimer::start(void* stream) {
  SMA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(start_), static_cast<cudaStream_t>(stream)));
}

float EventTimer::stop(void* stream) {
  const auto e = static_cast<cudaEvent_t>(stop_);
  SMA_CUDA_CHECK(cudaEventRecord(e, static_cast<cudaStream_t>(stream)));
  SMA_CUDA_CHECK(cudaEventSynchronize(e));
  float ms = 0;
  SMA_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start_), e));
  return ms;
}

}  // namespace sma::cuda
