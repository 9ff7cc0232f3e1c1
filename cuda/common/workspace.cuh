// cuda/common/workspace.cuh: temporary device memory taken with cudaMallocAsync on one stream and given back
// (cudaFreeAsync, stream-ordered) by the destructor, also when a later launch throws.
#pragma once

#include "check.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

namespace sma::cuda::detail {

class StreamWorkspace {
 public:
  explicit StreamWorkspace(cudaStream_t s) : s_(s) {}
  ~StreamWorkspace() {
    for (void* p : ptrs_) cudaFreeAsync(p, s_);
  }
  StreamWorkspace(const StreamWorkspace&) = delete;
  StreamWorkspace& operator=(const StreamWorkspace&) = delete;

  template <class T>
  T* alloc(long long n) {
    void* p = nullptr;
    SMA_CUDA_CHECK(cudaMallocAsync(&p, static_cast<std::size_t>(n > 0 ? n : 1) * sizeof(T), s_));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  cudaStream_t s_;
  std::vector<void*> ptrs_;
};

inline unsigned grid_for(long long n, int threads, long long cap = 65535LL * 16) {
  long long g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

}  // namespace sma::cuda::detail
