// cuda/model/chunk_table.cuh: what every device optimiser shares (DeviceAdamW in adamw.cu; DeviceOptimizer's RAdam
// and SGD in optimizer.cu, which also defines this class): the table that maps every block of an update launch to
// (range, first element), built once from the parameter ranges so that dozens of small parameters cost no extra
// launches, and the global gradient-norm clipping that may run before an update (two launches: a sum of squares
// per chunk, then one block that adds the chunks in a fixed order and writes the norm and the gradients' scale to
// device memory, which the update reads). The descriptors are plain structs so that the kernels
// (optim_kernels.cuh) can be compiled as host code by tests/cuda/emulation/.
#pragma once

#include <sma/cuda/adamw.hpp>
#include <sma/cuda/buffer.hpp>

#include <cuda_runtime.h>

#include <vector>

namespace sma::cuda::chunked {

constexpr int kThreads = 256, kNormThreads = 512;
constexpr long long kChunk = 4096;  // elements per block

struct RangeDesc {
  float* w;
  float* g;
  long long moment_offset;  // where the range's optimiser state starts (the ranges' state is packed)
  long long n;
  int decay;
};

struct ChunkDesc {
  int range;
  long long start;
};

/// Adam's moments (AdamW's and RAdam's) for element i of range r: the gradient, times the clipping scale *grad_scale
/// when there is one (gs: its value), into m and v at the element's state slot; returns the new (m, v).
struct AdamMoments {
  float m, v;
};
__device__ __forceinline__ AdamMoments adam_moments(const RangeDesc& r, long long i, float* m, float* v, float b1,
                                                    float b2, const float* grad_scale, float gs) {
  const long long k = r.moment_offset + i;
  const float g = grad_scale ? r.g[i] * gs : r.g[i];
  const float mk = b1 * m[k] + (1.f - b1) * g;
  const float vk = b2 * v[k] + (1.f - b2) * g * g;
  m[k] = mk;
  v[k] = vk;
  return {mk, vk};
}

class ChunkTable {
 public:
  ChunkTable() = default;
  /// Zero-size ranges are left out. `who` names the optimiser in the errors (a negative size, a null pointer, a
  /// clip_norm that is not finite).
  ChunkTable(const std::vector<AdamWRange>& ranges, double clip_norm, const char* who);

  long long total() const { return total_; }
  int chunks() const { return static_cast<int>(chunks_.size()); }
  const RangeDesc* range_desc() const { return ranges_.data(); }
  const ChunkDesc* chunk_desc() const { return chunks_.data(); }
  bool clipping() const { return clip_norm_ > 0; }

  /// With clipping on, queues the norm and the scale on `stream` (a cudaStream_t) and returns the device float
  /// that the update multiplies each gradient by; else nullptr (nothing queued). Needs chunks() > 0.
  const float* clip(void* stream);
  /// The norm of the last clip(), read back (waits for `stream`); ValueError naming `who` when clipping is off or
  /// clip() never ran.
  double last_grad_norm(void* stream, const char* who) const;

 private:
  double clip_norm_ = 0;
  long long total_ = 0;
  DeviceArray<RangeDesc> ranges_;
  DeviceArray<ChunkDesc> chunks_;
  DeviceArray<double> partial_, norm_;  // per-chunk sums of squares, the last norm
  DeviceArray<float> scale_;
  bool has_norm_ = false;
};

}  // namespace sma::cuda::chunked
