// sma/cuda/device.hpp: host-side view of the CUDA backend. No CUDA header is included here; the definitions live
// in the compiled sma::cuda library (cuda/), linked only when the toolkit was found.
#pragma once

#include <string>

namespace sma::cuda {

/// Number of CUDA devices visible to this process (0 when there is no driver or no GPU; never throws).
int device_count() noexcept;

/// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device `index`, or an explanation when it is unavailable.
std::string device_description(int index = 0);

}  // namespace sma::cuda
