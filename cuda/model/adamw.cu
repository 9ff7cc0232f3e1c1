// AdamW on the device (include/sma/cuda/adamw.hpp): one launch per step over a chunk table that maps every block
// to (range, first element), built once, so that dozens of small parameters cost no extra launches. Clipping adds
// two launches before it: a sum of squares per chunk, then one block that adds the chunks in a fixed order and
// writes the norm and the gradients' scale to device memory, which the update reads.
#include <sma/cuda/adamw.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace sma::cuda {
namespace {

constexpr int kThreads = 256, kNormThreads = 512;
constexpr long long kChunk = 4096;  // elements per block

struct RangeDesc {
  float* w;
  float* g;
  long long moment_offset;
  long long n;
  int decay;
};

struct ChunkDesc {
  int range;
  long long start;
};

struct StepArgs {
  float b1, b2, eps;
  int zero_grads;
};

// What changes from step to step: by value (step) or read from device memory (step_prepared, for graph replays).
struct StepScalars {
  float lr, lr_wd, inv_bc1, inv_sqrt_bc2;
};

__global__ void set_scalars_kernel(StepScalars sc, StepScalars* __restrict__ out) { *out = sc; }

// Fixed tree over a block's doubles (blockDim.x a power of 2); the total ends in part[0].
__device__ void block_sum(double* part) {
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    __syncthreads();
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
  }
  __syncthreads();
}

// partial[chunk] = sum of g^2 over the chunk, in double.
__global__ void __launch_bounds__(kThreads) grad_square_kernel(const RangeDesc* __restrict__ ranges,
                                                               const ChunkDesc* __restrict__ chunks,
                                                               double* __restrict__ partial) {
  __shared__ double part[kThreads];
  const ChunkDesc ch = chunks[blockIdx.x];
  const RangeDesc r = ranges[ch.range];
  const long long end = min(r.n, ch.start + kChunk);
  double s = 0;
  for (long long i = ch.start + threadIdx.x; i < end; i += kThreads) {
    const double g = r.g[i];
    s += g * g;
  }
  part[threadIdx.x] = s;
  block_sum(part);
  if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

// norm_scale[0] = the norm (double), scale[0] = max_norm / (norm + 1e-6) when the norm exceeds max_norm, else 1
// (sma::optim::clip_grad_norm's rule, the factor rounded to float as the CPU's T = float path does).
__global__ void __launch_bounds__(kNormThreads) clip_scale_kernel(int n, const double* __restrict__ partial,
                                                                  double max_norm, double* __restrict__ norm,
                                                                  float* __restrict__ scale) {
  __shared__ double part[kNormThreads];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += kNormThreads) s += partial[i];
  part[threadIdx.x] = s;
  block_sum(part);
  if (threadIdx.x == 0) {
    const double nm = sqrt(part[0]);
    norm[0] = nm;
    scale[0] = nm > max_norm ? static_cast<float>(max_norm / (nm + 1e-6)) : 1.f;
  }
}

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
    const long long k = r.moment_offset + i;
    const float g = grad_scale ? r.g[i] * gs : r.g[i];
    const float mk = a.b1 * m[k] + (1.f - a.b1) * g;
    const float vk = a.b2 * v[k] + (1.f - a.b2) * g * g;
    m[k] = mk;
    v[k] = vk;
    const float denom = sqrtf(vk) * sc.inv_sqrt_bc2 + a.eps;
    r.w[i] = r.w[i] * decay - sc.lr * (mk * sc.inv_bc1) / denom;
    if (a.zero_grads) r.g[i] = 0.f;
  }
}

}  // namespace

struct DeviceAdamW::Impl {
  AdamWConfig cfg;
  long long total = 0, step = 0;
  int nchunks = 0;
  DeviceArray<RangeDesc> ranges;
  DeviceArray<ChunkDesc> chunks;
  DeviceArray<float> m, v;
  DeviceArray<double> partial, norm;  // clipping: per-chunk sums of squares, the last norm
  DeviceArray<float> scale;
  DeviceArray<StepScalars> scalars;  // written by prepare_step, read by step_prepared's update
  bool has_norm = false;

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
  const bool clip = cfg.clip_norm > 0;
  if (clip) {
    grad_square_kernel<<<nchunks, kThreads, 0, s>>>(ranges.data(), chunks.data(), partial.data());
    SMA_CUDA_CHECK_LAUNCH();
    clip_scale_kernel<<<1, kNormThreads, 0, s>>>(nchunks, partial.data(), cfg.clip_norm, norm.data(),
                                                 scale.data());
    SMA_CUDA_CHECK_LAUNCH();
    has_norm = true;
  }
  adamw_kernel<<<nchunks, kThreads, 0, s>>>(ranges.data(), chunks.data(), m.data(), v.data(), args(zero_grads),
                                            host_sc, dev_sc, clip ? scale.data() : nullptr);
  SMA_CUDA_CHECK_LAUNCH();
}

DeviceAdamW::DeviceAdamW(std::vector<AdamWRange> ranges, const AdamWConfig& cfg) : impl_(std::make_unique<Impl>()) {
  if (!(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1))
    throw ValueError(str_cat("DeviceAdamW: betas must be in [0, 1), got ", cfg.beta1, ", ", cfg.beta2));
  if (!(cfg.eps > 0)) throw ValueError(str_cat("DeviceAdamW: eps must be > 0, got ", cfg.eps));
  if (!std::isfinite(cfg.clip_norm))
    throw ValueError(str_cat("DeviceAdamW: clip_norm must be finite, got ", cfg.clip_norm));
  impl_->cfg = cfg;
  std::vector<RangeDesc> rd;
  std::vector<ChunkDesc> cd;
  for (const AdamWRange& r : ranges) {
    if (r.size < 0 || (r.size > 0 && (!r.value || !r.grad)))
      throw ValueError("DeviceAdamW: a range has a negative size or a null pointer");
    if (r.size == 0) continue;
    const int idx = static_cast<int>(rd.size());
    rd.push_back({r.value, r.grad, impl_->total, r.size, r.decay ? 1 : 0});
    for (long long s = 0; s < r.size; s += kChunk) cd.push_back({idx, s});
    impl_->total += r.size;
  }
  impl_->nchunks = static_cast<int>(cd.size());
  impl_->ranges = DeviceArray<RangeDesc>(rd);
  impl_->chunks = DeviceArray<ChunkDesc>(cd);
  impl_->m = DeviceArray<float>(static_cast<std::size_t>(impl_->total));
  impl_->v = DeviceArray<float>(static_cast<std::size_t>(impl_->total));
  impl_->m.fill_bytes(0);
  impl_->v.fill_bytes(0);
  if (cfg.clip_norm > 0) {
    impl_->partial = DeviceArray<double>(std::max<std::size_t>(cd.size(), 1));
    impl_->norm = DeviceArray<double>(1);
    impl_->scale = DeviceArray<float>(1);
  }
  impl_->scalars = DeviceArray<StepScalars>(1);
  device_synchronize();  // the fills above ran on the legacy stream; a step may come on any stream
}

DeviceAdamW::~DeviceAdamW() = default;
DeviceAdamW::DeviceAdamW(DeviceAdamW&&) noexcept = default;
DeviceAdamW& DeviceAdamW::operator=(DeviceAdamW&&) noexcept = default;

const AdamWConfig& DeviceAdamW::config() const { return impl_->cfg; }
long long DeviceAdamW::steps() const { return impl_->step; }
long long DeviceAdamW::size() const { return impl_->total; }

void DeviceAdamW::step(double lr, void* stream, bool zero_grads) {
  Impl& m = *impl_;
  ++m.step;
  if (m.nchunks == 0) return;
  m.update(static_cast<cudaStream_t>(stream), zero_grads, m.scalars_for(lr), nullptr);
}

void DeviceAdamW::prepare_step(double lr, void* stream) {
  Impl& m = *impl_;
  ++m.step;
  if (m.nchunks == 0) return;
  // A kernel argument rather than a copy from host memory: the launch takes its arguments by value, so the next
  // step may overwrite the host's scalars at once, and nothing waits.
  set_scalars_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(m.scalars_for(lr), m.scalars.data());
  SMA_CUDA_CHECK_LAUNCH();
}

void DeviceAdamW::step_prepared(void* stream, bool zero_grads) {
  Impl& m = *impl_;
  if (m.nchunks == 0) return;
  m.update(static_cast<cudaStream_t>(stream), zero_grads, StepScalars{}, m.scalars.data());
}

double DeviceAdamW::last_grad_norm(void* stream) const {
  if (!(impl_->cfg.clip_norm > 0)) throw ValueError("DeviceAdamW::last_grad_norm: clipping is off (clip_norm <= 0)");
  if (!impl_->has_norm) throw ValueError("DeviceAdamW::last_grad_norm: no step with clipping yet");
  return impl_->norm.download(stream)[0];
}

}  // namespace sma::cuda
