// sma/cuda/device.hpp: host-side view of the CUDA backend. No CUDA header is included here; the definitions live
// in the compiled sma::cuda library (cuda/), linked only when the toolkit was found.
#pragma once

#include <cstddef>
#include <string>

namespace sma::cuda {

/// Number of CUDA devices visible to this process (0 when there is no driver or no GPU; never throws).
int device_count() noexcept;

/// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`, or an explanation when it is unavailable.
std::string device_description(int index = 0);

/// Memory of the current device, for benchmarks and diagnostics. Throws CudaError when the device cannot be asked.
struct DeviceMemory {
  std::size_t total = 0;  ///< bytes on the card
  std::size_t used = 0;   ///< total - free (cudaMemGetInfo): every allocation on the card, other processes' too
  /// The default memory pool, which serves the backend's temporaries (cudaMallocAsync): bytes reserved now, and
  /// the high-water mark of bytes in use since the last reset_pool_peak().
  std::size_t pool_reserved = 0, pool_used_peak = 0;
};
DeviceMemory device_memory();
/// Restarts the default pool's high-water mark (DeviceMemory::pool_used_peak) at its current use.
void reset_pool_peak();

}  // namespace sma::cuda
