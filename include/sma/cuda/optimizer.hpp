// sma/cuda/optimizer.hpp: the device counterpart of sma::train::Optimizer: AdamW, RAdam or SGD over device
// parameter ranges, chosen at run time (definitions in cuda/model/optimizer.cu). AdamW runs DeviceAdamW
// (sma/cuda/adamw.hpp) unchanged; RAdam and SGD run the same structure: one fused launch per step over a chunk table
// built once, optional global-norm clipping read from device memory, per-step scalars computed on the host in
// double from the step count (bias corrections, RAdam's rectification), so a step never waits for the device.
// The updates are those of sma::optim::Adam (adamw and radam variants) and sma::optim::Sgd; the state is fp32 (the
// CPU keeps doubles) and the update is computed in fp32.
#pragma once

#include <sma/cuda/adamw.hpp>

#include <memory>
#include <string>
#include <vector>

namespace sma::cuda {

enum class DeviceOptimizerKind { adamw, radam, sgd };

/// "adamw", "radam", "sgd" (sma::train::to_string's names).
const char* to_string(DeviceOptimizerKind k);
/// The inverse of to_string, with "adam" for adamw as sma::train::parse_optimizer; ValueError otherwise.
DeviceOptimizerKind parse_device_optimizer(const std::string& s);

/// Ranges of parameter values and gradients; `decay` says which take weight decay.
using OptimizerRange = AdamWRange;

/// The defaults are sma::train::OptimizerConfig's (beta2 = 0.98, weight decay 0.01), with clipping off.
struct DeviceOptimizerConfig {
  DeviceOptimizerKind kind = DeviceOptimizerKind::adamw;
  double beta1 = 0.9, beta2 = 0.98, eps = 1e-8;  ///< AdamW, RAdam
  double momentum = 0.9;                         ///< SGD
  bool nesterov = false;                         ///< SGD
  /// AdamW, RAdam: decoupled (w -= lr wd w); SGD: L2 (g += wd w); only on the ranges marked `decay`.
  double weight_decay = 0.01;
  /// As AdamWConfig::clip_norm: the global gradient norm is clipped to clip_norm before each update (<= 0: off).
  double clip_norm = 0;
};

class DeviceOptimizer {
 public:
  /// Throws ValueError for betas outside [0, 1), eps <= 0, momentum outside [0, 1), a clip_norm or weight decay
  /// that is not finite, or a range with a negative size or a null pointer (zero-size ranges are allowed).
  DeviceOptimizer(std::vector<OptimizerRange> ranges, const DeviceOptimizerConfig& cfg);
  /// AdamW with `cfg`: the same updates, bitwise, as DeviceAdamW(ranges, cfg).
  DeviceOptimizer(std::vector<OptimizerRange> ranges, const AdamWConfig& cfg);
  ~DeviceOptimizer();
  DeviceOptimizer(DeviceOptimizer&&) noexcept;
  DeviceOptimizer& operator=(DeviceOptimizer&&) noexcept;

  DeviceOptimizerKind kind() const;
  const char* name() const { return to_string(kind()); }
  const DeviceOptimizerConfig& config() const;
  long long steps() const;
  /// Elements over all ranges.
  long long size() const;
  /// One update with learning rate `lr`, queued on `stream`; `zero_grads` and clipping as DeviceAdamW::step.
  void step(double lr, void* stream = nullptr, bool zero_grads = false);
  /// step() in two halves, as DeviceAdamW::prepare_step / step_prepared, for a step recorded once as a CUDA graph
  /// and replayed: prepare_step counts the step and queues a one-thread kernel that writes this step's scalars
  /// (computed as step() does, so the updates are bitwise the same) to device memory; step_prepared queues the
  /// clipping and the update, which read them from there.
  void prepare_step(double lr, void* stream = nullptr);
  void step_prepared(void* stream = nullptr, bool zero_grads = false);
  /// As DeviceAdamW::last_grad_norm.
  double last_grad_norm(void* stream = nullptr) const;
  /// The DeviceAdamW that runs the adamw kind; nullptr for the others.
  DeviceAdamW* adamw();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
