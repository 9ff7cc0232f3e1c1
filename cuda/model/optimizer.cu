// DeviceOptimizer (include/sma/cuda/optimizer.hpp): AdamW through DeviceAdamW, RAdam and SGD through the kernels of
// optim_kernels.cuh; and the chunk table with its clipping (chunk_table.cuh) that all of them use.
#include <sma/cuda/optimizer.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "optim_kernels.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

namespace sma::cuda {

namespace chunked {

ChunkTable::ChunkTable(const std::vector<AdamWRange>& ranges, double clip_norm, const char* who)
    : clip_norm_(clip_norm) {
  if (!std::isfinite(clip_norm)) throw ValueError(str_cat(who, ": clip_norm must be finite, got ", clip_norm));
  std::vector<RangeDesc> rd;
  std::vector<ChunkDesc> cd;
  for (const AdamWRange& r : ranges) {
    if (r.size < 0 || (r.size > 0 && (!r.value || !r.grad)))
      throw ValueError(str_cat(who, ": a range has a negative size or a null pointer"));
    if (r.size == 0) continue;
    const int idx = static_cast<int>(rd.size());
    rd.push_back({r.value, r.grad, total_, r.size, r.decay ? 1 : 0});
    for (long long s = 0; s < r.size; s += kChunk) cd.push_back({idx, s});
    total_ += r.size;
  }
  ranges_ = DeviceArray<RangeDesc>(rd);
  chunks_ = DeviceArray<ChunkDesc>(cd);
  if (clipping()) {
    partial_ = DeviceArray<double>(std::max<std::size_t>(cd.size(), 1));
    norm_ = DeviceArray<double>(1);
    scale_ = DeviceArray<float>(1);
  }
}

const float* ChunkTable::clip(void* stream) {
  if (!clipping()) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  grad_square_kernel<<<chunks(), kThreads, 0, s>>>(ranges_.data(), chunks_.data(), partial_.data());
  SMA_CUDA_CHECK_LAUNCH();
  clip_scale_kernel<<<1, kNormThreads, 0, s>>>(chunks(), partial_.data(), clip_norm_, norm_.data(), scale_.data());
  SMA_CUDA_CHECK_LAUNCH();
  has_norm_ = true;
  return scale_.data();
}

double ChunkTable::last_grad_norm(void* stream, const char* who) const {
  if (!clipping()) throw ValueError(str_cat(who, ": clipping is off (clip_norm <= 0)"));
  if (!has_norm_) throw ValueError(str_cat(who, ": no step with clipping yet"));
  return norm_.download(stream)[0];
}

}  // namespace chunked

const char* to_string(DeviceOptimizerKind k) {
  return k == DeviceOptimizerKind::adamw ? "adamw" : k == DeviceOptimizerKind::radam ? "radam" : "sgd";
}

DeviceOptimizerKind parse_device_optimizer(const std::string& s) {
  if (s == "adamw" || s == "adam") return DeviceOptimizerKind::adamw;
  if (s == "radam") return DeviceOptimizerKind::radam;
  if (s == "sgd") return DeviceOptimizerKind::sgd;
  throw ValueError(str_cat("unknown device optimiser '", s, "' (expected adamw, radam or sgd)"));
}

namespace {

AdamWConfig adamw_config(const DeviceOptimizerConfig& c) {
  AdamWConfig a;
  a.beta1 = c.beta1;
  a.beta2 = c.beta2;
  a.eps = c.eps;
  a.weight_decay = c.weight_decay;
  a.clip_norm = c.clip_norm;
  return a;
}

DeviceOptimizerConfig optimizer_config(const AdamWConfig& a) {
  DeviceOptimizerConfig c;
  c.kind = DeviceOptimizerKind::adamw;
  c.beta1 = a.beta1;
  c.beta2 = a.beta2;
  c.eps = a.eps;
  c.weight_decay = a.weight_decay;
  c.clip_norm = a.clip_norm;
  return c;
}

// Writes one step's scalars to device memory (prepare_step): a kernel argument rather than a copy from host memory,
// so the host's copy may change at once and nothing waits.
template <class Args>
__global__ void store_args_kernel(Args a, Args* __restrict__ out) {
  *out = a;
}

}  // namespace

struct DeviceOptimizer::Impl {
  DeviceOptimizerConfig cfg;
  std::optional<DeviceAdamW> adamw;  // the adamw kind
  // radam and sgd:
  long long step = 0;
  chunked::ChunkTable table;
  DeviceArray<float> m, v;  // radam: the moments; sgd: m is the momentum buffer
  DeviceArray<chunked::RAdamArgs> radam_args;  // written by prepare_step (radam)
  DeviceArray<chunked::SgdArgs> sgd_args;      // written by prepare_step (sgd)

  /// The clipping and the update of step `step`, with scalars for `lr` (prepared = false) or those that
  /// prepare_step wrote (prepared = true).
  void update(double lr, bool prepared, cudaStream_t s, bool zero_grads);
};

void DeviceOptimizer::Impl::update(double lr, bool prepared, cudaStream_t s, bool zero_grads) {
  const float* scale = table.clip(s);
  const int zg = zero_grads ? 1 : 0;
  if (cfg.kind == DeviceOptimizerKind::radam) {
    const chunked::RAdamArgs a = prepared ? chunked::RAdamArgs{} : chunked::radam_args(cfg, step, lr);
    chunked::radam_kernel<<<table.chunks(), chunked::kThreads, 0, s>>>(
        table.range_desc(), table.chunk_desc(), m.data(), v.data(), a, prepared ? radam_args.data() : nullptr, zg,
        scale);
  } else {
    const chunked::SgdArgs a = prepared ? chunked::SgdArgs{} : chunked::sgd_args(cfg, step, lr);
    chunked::sgd_kernel<<<table.chunks(), chunked::kThreads, 0, s>>>(
        table.range_desc(), table.chunk_desc(), m.data(), a, prepared ? sgd_args.data() : nullptr, zg, scale);
  }
  SMA_CUDA_CHECK_LAUNCH();
}

DeviceOptimizer::DeviceOptimizer(std::vector<OptimizerRange> ranges, const DeviceOptimizerConfig& cfg)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  if (!std::isfinite(cfg.weight_decay))
    throw ValueError(str_cat("DeviceOptimizer: weight_decay must be finite, got ", cfg.weight_decay));
  switch (cfg.kind) {
    case DeviceOptimizerKind::adamw:
      m.adamw.emplace(std::move(ranges), adamw_config(cfg));
      return;
    case DeviceOptimizerKind::radam:
      if (!(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1))
        throw ValueError(str_cat("DeviceOptimizer (radam): betas must be in [0, 1), got ", cfg.beta1, ", ",
                                 cfg.beta2));
      if (!(cfg.eps > 0)) throw ValueError(str_cat("DeviceOptimizer (radam): eps must be > 0, got ", cfg.eps));
      break;
    case DeviceOptimizerKind::sgd:
      if (!(cfg.momentum >= 0 && cfg.momentum < 1))
        throw ValueError(str_cat("DeviceOptimizer (sgd): momentum must be in [0, 1), got ", cfg.momentum));
      break;
    default:
      throw ValueError(str_cat("DeviceOptimizer: unknown kind ", static_cast<int>(cfg.kind)));
  }
  m.table = chunked::ChunkTable(ranges, cfg.clip_norm, cfg.kind == DeviceOptimizerKind::radam
                                                           ? "DeviceOptimizer (radam)"
                                                           : "DeviceOptimizer (sgd)");
  const auto total = static_cast<std::size_t>(m.table.total());
  m.m = DeviceArray<float>(total);
  m.m.fill_bytes(0);
  if (cfg.kind == DeviceOptimizerKind::radam) {
    m.v = DeviceArray<float>(total);
    m.v.fill_bytes(0);
    m.radam_args = DeviceArray<chunked::RAdamArgs>(1);
  } else {
    m.sgd_args = DeviceArray<chunked::SgdArgs>(1);
  }
  device_synchronize();  // the fills above ran on the legacy stream; a step may come on any stream
}

DeviceOptimizer::DeviceOptimizer(std::vector<OptimizerRange> ranges, const AdamWConfig& cfg)
    : impl_(std::make_unique<Impl>()) {
  impl_->cfg = optimizer_config(cfg);
  impl_->adamw.emplace(std::move(ranges), cfg);
}

DeviceOptimizer::~DeviceOptimizer() = default;
DeviceOptimizer::DeviceOptimizer(DeviceOptimizer&&) noexcept = default;
DeviceOptimizer& DeviceOptimizer::operator=(DeviceOptimizer&&) noexcept = default;

DeviceOptimizerKind DeviceOptimizer::kind() const { return impl_->cfg.kind; }
const DeviceOptimizerConfig& DeviceOptimizer::config() const { return impl_->cfg; }
long long DeviceOptimizer::steps() const { return impl_->adamw ? impl_->adamw->steps() : impl_->step; }
long long DeviceOptimizer::size() const { return impl_->adamw ? impl_->adamw->size() : impl_->table.total(); }
DeviceAdamW* DeviceOptimizer::adamw() { return impl_->adamw ? &*impl_->adamw : nullptr; }

void DeviceOptimizer::step(double lr, void* stream, bool zero_grads) {
  Impl& m = *impl_;
  if (m.adamw) {
    m.adamw->step(lr, stream, zero_grads);
    return;
  }
  ++m.step;
  if (m.table.chunks() == 0) return;
  m.update(lr, /*prepared=*/false, static_cast<cudaStream_t>(stream), zero_grads);
}

void DeviceOptimizer::prepare_step(double lr, void* stream) {
  Impl& m = *impl_;
  if (m.adamw) {
    m.adamw->prepare_step(lr, stream);
    return;
  }
  ++m.step;
  if (m.table.chunks() == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (m.cfg.kind == DeviceOptimizerKind::radam)
    store_args_kernel<<<1, 1, 0, s>>>(chunked::radam_args(m.cfg, m.step, lr), m.radam_args.data());
  else
    store_args_kernel<<<1, 1, 0, s>>>(chunked::sgd_args(m.cfg, m.step, lr), m.sgd_args.data());
  SMA_CUDA_CHECK_LAUNCH();
}

void DeviceOptimizer::step_prepared(void* stream, bool zero_grads) {
  Impl& m = *impl_;
  if (m.adamw) {
    m.adamw->step_prepared(stream, zero_grads);
    return;
  }
  if (m.table.chunks() == 0) return;
  m.update(0.0, /*prepared=*/true, static_cast<cudaStream_t>(stream), zero_grads);
}

double DeviceOptimizer::last_grad_norm(void* stream) const {
  if (impl_->adamw) return impl_->adamw->last_grad_norm(stream);
  return impl_->table.last_grad_norm(stream, "DeviceOptimizer::last_grad_norm");
}

}  // namespace sma::cuda
