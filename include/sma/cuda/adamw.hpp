// sma/cuda/adamw.hpp: AdamW on the device (definitions in cuda/model/adamw.cu), the update of sma::optim::Adam's
// adamw variant: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, w = w (1 - lr wd) - lr (m/bc1) / (sqrt(v/bc2) + eps),
// bc_i = 1 - b_i^t, with weight decay only on the ranges marked `decay` (sma::train::Optimizer decays the matrices,
// rank >= 2, by default). One fused kernel over every range (a chunk table built once); the bias corrections are
// computed on the host in double from the step count, so a step never waits for the device. The moments are fp32
// (the CPU keeps doubles); the update is computed in fp32.
#pragma once

#include <sma/cuda/buffer.hpp>

#include <memory>
#include <vector>

namespace sma::cuda {

/// The defaults are sma::train::OptimizerConfig's (note beta2 = 0.98).
struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.98, eps = 1e-8;
  double weight_decay = 0.01;
  /// Global gradient-norm clipping before each update, as sma::optim::clip_grad_norm (sma::train::TrainConfig's
  /// clip_norm, 1.0 there): when the norm over every range exceeds clip_norm, the update sees the gradients times
  /// clip_norm / (norm + 1e-6). <= 0: off (the default here, so that a bare optimiser is plain AdamW).
  double clip_norm = 0;
};

/// `size` floats of parameter values and their gradients (device memory).
struct AdamWRange {
  float* value = nullptr;
  float* grad = nullptr;
  long long size = 0;
  bool decay = true;
};

class DeviceAdamW {
 public:
  DeviceAdamW(std::vector<AdamWRange> ranges, const AdamWConfig& cfg);
  ~DeviceAdamW();
  DeviceAdamW(DeviceAdamW&&) noexcept;
  DeviceAdamW& operator=(DeviceAdamW&&) noexcept;

  const AdamWConfig& config() const;
  long long steps() const;
  /// Elements over all ranges.
  long long size() const;
  /// One update with learning rate `lr`, queued on `stream`. With `zero_grads` the kernel also clears each
  /// gradient after reading it (saving the separate zero_grad pass of a training step). With clip_norm > 0 the
  /// norm is taken on the device first (in double, summed in a fixed order) and the update reads the scaled
  /// gradients; the stored gradients are not rescaled. Nothing waits for the host.
  void step(double lr, void* stream = nullptr, bool zero_grads = false);
  /// step() in two halves, for a step recorded once as a CUDA graph and replayed: prepare_step counts the step
  /// and queues a one-thread kernel that writes this step's learning rate and bias corrections (computed as
  /// step() does, so the updates are bitwise the same) to device memory; step_prepared queues the update, which
  /// reads them from there. Only step_prepared goes into the graph, so a replay sees each step's own scalars.
  void prepare_step(double lr, void* stream = nullptr);
  void step_prepared(void* stream = nullptr, bool zero_grads = false);
  /// The gradient norm (before clipping) of the last step with clip_norm > 0, read back (waits for `stream`);
  /// ValueError when clipping is off or no step was taken.
  double last_grad_norm(void* stream = nullptr) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
