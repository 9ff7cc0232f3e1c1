// Device discovery for the CUDA backend: the first translation unit of sma::cuda.
#include <sma/cuda/device.hpp>

#include "check.cuh"

#include <cuda_runtime.h>

#include <cstdint>

#include <cstdio>
#include <string>

namespace sma::cuda {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_description(int index) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(err);
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %.1f GiB)", prop.name, prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

namespace {
cudaMemPool_t default_pool() {
  int dev = 0;
  SMA_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t pool{};
  SMA_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
  return pool;
}
}  // namespace

DeviceMemory device_memory() {
  DeviceMemory m;
  std::size_t free_bytes = 0;
  SMA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &m.total));
  m.used = m.total - free_bytes;
  const cudaMemPool_t pool = default_pool();
  std::uint64_t v = 0;
  SMA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &v));
  m.pool_reserved = static_cast<std::size_t>(v);
  SMA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &v));
  m.pool_used_peak = static_cast<std::size_t>(v);
  return m;
}

void reset_pool_peak() {
  std::uint64_t zero = 0;  // the only value the attribute accepts: the mark restarts at the current use
  SMA_CUDA_CHECK(cudaMemPoolSetAttribute(default_pool(), cudaMemPoolAttrUsedMemHigh, &zero));
}

}  // namespace sma::cuda
