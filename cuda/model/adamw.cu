// AdamW on the device (include/sma/cuda/adamw.hpp): one launch per step over the chunk table of chunk_table.cuh
// (shared with DeviceOptimizer's other kinds, cuda/model/optimizer.cu), after its clipping launches when
// clip_norm > 0.
#include <sma/cuda/adamw.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "chunk_table.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <utility>

namespace sma::cuda {
namespace {

using chunked::ChunkDesc;
using chunked::kChunk;
using chunked::kThreads;
using chunked::RangeDesc;

struct StepArgs {
  float b1, b2, eps;
  int zero_grads;
};

// What changes from step to step: by value (step) or read from device memory (step_prepared, for graph replays).
struct StepScalars {
  float lr, lr_wd, inv_bc1, inv_sqrt_bc2;
};

__global__ void set_scalars_kernel(StepScalars sc, StepScalars* __restrict__ out) { *out = sc; }

__global__ void __launch_bounds__(kThreads) adamw_kernel(const RangeDesc* __restrict__ ranges,
                                                         const ChunkDesc* __restrict__ chunks,
                                                         float* __restrict__ m, float* __restrict__ v, StepArgs a,
                                                         StepScalars host_sc, const StepScalars* __restrict__ dev_sc,
                                                         const float* __restrict__ grad_scale) {
  const ChunkDesc ch = chunks[blockIdx.x];
  const RangeDesc r = ranges[ch.range];
  const long long end = min(r.n, ch.start + kChunk);
  const StepScalars sc = dev_sc ? *dev_sc : host_sc;
  const float decay = r.decay ? 1.f - sc.lr_wd : 1.f;
  const float gs = grad_scale ? *grad_scale : 1.f;
  for (long long i = ch.start + threadIdx.x; i < end; i += kThreads) {
    const chunked::AdamMoments mv = chunked::adam_moments(r, i, m, v, a.b1, a.b2, grad_scale, gs);
    const float denom = sqrtf(mv.v) * sc.inv_sqrt_bc2 + a.eps;
    r.w[i] = r.w[i] * decay - sc.lr * (mv.m * sc.inv_bc1) / denom;
    if (a.zero_grads) r.g[i] = 0.f;
  }
}

}  // namespace

struct DeviceAdamW::Impl {
  AdamWConfig cfg;
  long long step = 0;
  chunked::ChunkTable table;
  DeviceArray<float> m, v;
  DeviceArray<StepScalars> scalars;  // written by prepare_step, read by step_prepared's update

  StepScalars scalars_for(double lr) const {
    const double t = static_cast<double>(step);
    StepScalars sc;
    sc.lr = static_cast<float>(lr);
    sc.lr_wd = static_cast<float>(lr * cfg.weight_decay);
    sc.inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(cfg.beta1, t)));
    sc.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(cfg.beta2, t)));
    return sc;
  }
  StepArgs args(bool zero_grads) const {
    StepArgs a;
    a.b1 = static_cast<float>(cfg.beta1);
    a.b2 = static_cast<float>(cfg.beta2);
    a.eps = static_cast<float>(cfg.eps);
    a.zero_grads = zero_grads ? 1 : 0;
    return a;
  }
  void update(cudaStream_t s, bool zero_grads, const StepScalars& host_sc, const StepScalars* dev_sc);
};

void DeviceAdamW::Impl::update(cudaStream_t s, bool zero_grads, const StepScalars& host_sc,
                               const StepScalars* dev_sc) {
  const float* scale = table.clip(s);
  adamw_kernel<<<table.chunks(), kThreads, 0, s>>>(table.range_desc(), table.chunk_desc(), m.data(), v.data(),
                                                   args(zero_grads), host_sc, dev_sc, scale);
  SMA_CUDA_CHECK_LAUNCH();
}

DeviceAdamW::DeviceAdamW(std::vector<AdamWRange> ranges, const AdamWConfig& cfg) : impl_(std::make_unique<Impl>()) {
  if (!(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1))
    throw ValueError(str_cat("DeviceAdamW: betas must be in [0, 1), got ", cfg.beta1, ", ", cfg.beta2));
  if (!(cfg.eps > 0)) throw ValueError(str_cat("DeviceAdamW: eps must be > 0, got ", cfg.eps));
  impl_->cfg = cfg;
  impl_->table = chunked::ChunkTable(ranges, cfg.clip_norm, "DeviceAdamW");
  const auto total = static_cast<std::size_t>(impl_->table.total());
  impl_->m = DeviceArray<float>(total);
  impl_->v = DeviceArray<float>(total);
  impl_->m.fill_bytes(0);
  impl_->v.fill_bytes(0);
  impl_->scalars = DeviceArray<StepScalars>(1);
  device_synchronize();  // the fills above ran on the legacy stream; a step may come on any stream
}

DeviceAdamW::~DeviceAdamW() = default;
DeviceAdamW::DeviceAdamW(DeviceAdamW&&) noexcept = default;
DeviceAdamW& DeviceAdamW::operator=(DeviceAdamW&&) noexcept = default;

const AdamWConfig& DeviceAdamW::config() const { return impl_->cfg; }
long long DeviceAdamW::steps() const { return impl_->step; }
long long DeviceAdamW::size() const { return impl_->table.total(); }

void DeviceAdamW::step(double lr, void* stream, bool zero_grads) {
  Impl& m = *impl_;
  ++m.step;
  if (m.table.chunks() == 0) return;
  m.update(static_cast<cudaStream_t>(stream), zero_grads, m.scalars_for(lr), nullptr);
}

void DeviceAdamW::prepare_step(double lr, void* stream) {
  Impl& m = *impl_;
  ++m.step;
  if (m.table.chunks() == 0) return;
  // A kernel argument rather than a copy from host memory: the launch takes its arguments by value, so the next
  // step may overwrite the host's scalars at once, and nothing waits.
  set_scalars_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(m.scalars_for(lr), m.scalars.data());
  SMA_CUDA_CHECK_LAUNCH();
}

void DeviceAdamW::step_prepared(void* stream, bool zero_grads) {
  Impl& m = *impl_;
  if (m.table.chunks() == 0) return;
  m.update(static_cast<cudaStream_t>(stream), zero_grads, StepScalars{}, m.scalars.data());
}

double DeviceAdamW::last_grad_norm(void* stream) const {
  return impl_->table.last_grad_norm(stream, "DeviceAdamW::last_grad_norm");
}

}  // namespace sma::cuda
