// SeqBoatModelDevice (include/sma/cuda/seqboat_model.hpp): encoder, the layers, the final norm, mean pooling and the
// decoder on one stream, with the loss and AdamW; nothing waits for the host unless a value is read back.
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/loss.hpp>
#include <sma/cuda/optimizer.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/seqboat_model_device.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/gemm.cuh"
#include "../common/workspace.cuh"
#include "param_table.cuh"
#include "rows.cuh"
#include "step_graph.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda {
namespace {

constexpr int kPoolRows = 8;  // row groups of the pooling block (32 channels x 8 groups)

// pooled[b, c] = sum over the row's real tokens of top[b, t, c] / count (0 for an all-padding row); counts[b].
// The 8 groups' partial sums are added in group order (deterministic).
__global__ void pool_forward_kernel(int L, int D, const float* __restrict__ top, const std::uint8_t* __restrict__ pad,
                                    float* __restrict__ pooled, int* __restrict__ counts) {
  __shared__ float part[kPoolRows][32];
  __shared__ int cnt[kPoolRows][32];
  const int b = blockIdx.y, c = blockIdx.x * 32 + threadIdx.x, g = threadIdx.y;
  float s = 0.f;
  int n = 0;
  for (int t = g; t < L; t += kPoolRows) {
    const long long row = static_cast<long long>(b) * L + t;
    if (pad && pad[row]) continue;
    ++n;
    if (c < D) s += top[row * D + c];
  }
  part[g][threadIdx.x] = s;
  cnt[g][threadIdx.x] = n;
  __syncthreads();
  if (g == 0) {
    float tot = 0.f;
    int count = 0;
    for (int k = 0; k < kPoolRows; ++k) {
      tot += part[k][threadIdx.x];
      count += cnt[k][threadIdx.x];
    }
    if (c < D) pooled[static_cast<long long>(b) * D + c] = count > 0 ? tot / static_cast<float>(count) : 0.f;
    if (blockIdx.x == 0 && threadIdx.x == 0) counts[b] = count;
  }
}

__global__ void pool_backward_kernel(long long n, int L, int D, const float* __restrict__ dpooled,
                                     const std::uint8_t* __restrict__ pad, const int* __restrict__ counts,
                                     float* __restrict__ dtop) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / D;
    const int c = static_cast<int>(i - row * D);
    const int b = static_cast<int>(row / L);
    const int cnt = counts[b];
    dtop[i] = (pad && pad[row]) || cnt == 0 ? 0.f : dpooled[static_cast<long long>(b) * D + c] / static_cast<float>(cnt);
  }
}

unsigned grid(long long n) { return detail::grid_for(n, 256); }

}  // namespace

struct SeqBoatModelDevice::Impl {
  SeqBoatModelDeviceConfig cfg;
  std::vector<SeqBoatLayerDevice> layers;
  cublasHandle_t blas = nullptr;
  detail::ParamTable params{"SeqBoatModelDevice"};  // encoder., final_norm., decoder. owned; every one listed
  bool training = true;
  std::optional<DeviceOptimizer> opt;
  bool grads_zero = true;  ///< host-side knowledge that every gradient is 0 (train_step skips zero_grad)

  int B = 0, L = 0;
  bool has_forward = false, has_padding = false, bn_batch_stats = false;
  const float* last_layer_out = nullptr;  ///< the last layer's output (the final norm's input)
  DeviceArray<float> x, h0, h1, top, mean, rstd, bn_mean, bn_invstd, pooled, logits, dlogits;
  DeviceArray<std::uint8_t> padding;
  DeviceArray<int> counts;
  DeviceArray<double> loss_result;
  detail::StepGraph graph;

  ~Impl() {
    if (blas) cublasDestroy(blas);
  }
  float* p(const std::string& n) const { return params.p(n); }
  float* g(const std::string& n) const { return params.g(n); }
  static void ensure(DeviceArray<float>& a, long long n) {
    if (static_cast<long long>(a.size()) != n) a = DeviceArray<float>(static_cast<std::size_t>(std::max(n, 1LL)));
  }
  const float* final_weight() const {
    return cfg.final_norm == NormKind::scalenorm ? p("final_norm.norm.scalar") : p("final_norm.norm.weight");
  }
  float* final_dweight() const {
    return cfg.final_norm == NormKind::scalenorm ? g("final_norm.norm.scalar") : g("final_norm.norm.weight");
  }
};

SeqBoatModelDevice::SeqBoatModelDevice(const SeqBoatModelDeviceConfig& cfg, std::vector<SeqBoatLayerDevice> layers,
                                       const std::vector<std::pair<std::string, std::vector<float>>>& params,
                                       const std::vector<DeviceParamInfo>& info)
    : impl_(std::make_unique<Impl>()) {
  if (cfg.d_input < 1 || cfg.d_output < 1 || cfg.d_model < 1)
    throw ValueError(str_cat("SeqBoatModelDevice: d_input, d_output, d_model must be >= 1, got ", cfg.d_input, ", ",
                             cfg.d_output, ", ", cfg.d_model));
  Impl& m = *impl_;
  m.cfg = cfg;
  m.layers = std::move(layers);
  for (std::size_t i = 0; i < m.layers.size(); ++i)
    if (m.layers[i].config().embed_dim != cfg.d_model)
      throw ShapeError(str_cat("SeqBoatModelDevice: layer ", i, " has embed_dim ", m.layers[i].config().embed_dim,
                               ", the model d_model ", cfg.d_model));
  const long long D = cfg.d_model, Di = cfg.d_input, C = cfg.d_output;
  std::map<std::string, long long> expected = {
      {"encoder.weight", D * Di}, {"encoder.bias", D}, {"decoder.weight", C * D}, {"decoder.bias", C}};
  for (const auto& [name, vals] : params) {
    auto it = expected.find(name);
    if (it != expected.end() && static_cast<long long>(vals.size()) != it->second)
      throw ShapeError(str_cat("SeqBoatModelDevice: parameter ", name, " has ", vals.size(), " values, expected ",
                               it->second));
    m.params.own(name, vals);
  }
  for (const auto& [name, n] : expected)
    if (!m.params.owns(name)) throw ValueError(str_cat("SeqBoatModelDevice: parameter ", name, " is missing"));
  if (cfg.prenorm && cfg.final_norm == NormKind::batchnorm)
    for (const char* name : {"final_norm.norm.running_mean", "final_norm.norm.running_var"})
      if (!m.params.owns(name)) throw ValueError(str_cat("SeqBoatModelDevice: batchnorm needs the buffer ", name));
  // Every parameter's storage, in the CPU order.
  std::map<std::string, DeviceParamRef> layer_refs;
  for (std::size_t i = 0; i < m.layers.size(); ++i)
    for (DeviceParamRef r : m.layers[i].param_refs()) {
      r.name = str_cat("seq_layers.", i, ".", r.name);
      layer_refs.emplace(r.name, r);
    }
  m.params.bind(info, layer_refs);
  m.loss_result = DeviceArray<double>(std::vector<double>{0, 0, 0, -1, 0});  // no loss yet, no bad label
  SMA_CUDA_CHECK(cublasCreate(&m.blas));
  set_training(true);
  set_dropout_seed(0);
}

SeqBoatModelDevice::~SeqBoatModelDevice() = default;
SeqBoatModelDevice::SeqBoatModelDevice(SeqBoatModelDevice&&) noexcept = default;
SeqBoatModelDevice& SeqBoatModelDevice::operator=(SeqBoatModelDevice&&) noexcept = default;

const SeqBoatModelDeviceConfig& SeqBoatModelDevice::config() const { return impl_->cfg; }
int SeqBoatModelDevice::n_layers() const { return static_cast<int>(impl_->layers.size()); }
SeqBoatLayerDevice& SeqBoatModelDevice::layer(int i) {
  if (i < 0 || i >= n_layers()) throw ValueError(str_cat("SeqBoatModelDevice::layer: no layer ", i));
  return impl_->layers[static_cast<std::size_t>(i)];
}
void SeqBoatModelDevice::set_training(bool on) {
  if (on != impl_->training) impl_->graph.forget();
  impl_->training = on;
  for (auto& l : impl_->layers) l.set_training(on);
}
bool SeqBoatModelDevice::training() const { return impl_->training; }
void SeqBoatModelDevice::set_dropout_seed(std::uint64_t seed, void* stream) {
  // Layer i's own seed, so that no two layers draw the same masks.
  for (std::size_t i = 0; i < impl_->layers.size(); ++i)
    impl_->layers[i].set_dropout_seed(dropout_mix(seed ^ dropout_mix(i + 1)), stream);
}
void SeqBoatModelDevice::set_bf16_projections(bool on) {
  if (on != (impl_->layers.empty() ? false : impl_->layers[0].config().bf16_projections)) {
    impl_->has_forward = false;
    impl_->graph.forget();
  }
  for (auto& l : impl_->layers) l.set_bf16_projections(on);
}
void SeqBoatModelDevice::set_bf16_attention(bool on) {
  if (on != (impl_->layers.empty() ? false : impl_->layers[0].config().attention.bf16)) {
    impl_->has_forward = false;
    impl_->graph.forget();
  }
  for (auto& l : impl_->layers) l.set_bf16_attention(on);
}
const float* SeqBoatModelDevice::logits() const { return impl_->logits.data(); }

void SeqBoatModelDevice::forward(int batch, int length, const float* x, const std::uint8_t* padding, float* logits,
                                 void* stream) {
  if (batch < 1 || length < 1)
    throw ValueError(str_cat("SeqBoatModelDevice::forward: batch ", batch, " and length ", length, " must be >= 1"));
  if (!x) throw ValueError("SeqBoatModelDevice::forward: x is null");
  Impl& m = *impl_;
  const SeqBoatModelDeviceConfig& c = m.cfg;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const long long N = static_cast<long long>(batch) * length;
  const int D = c.d_model, Di = c.d_input, C = c.d_output;
  m.has_forward = false;
  if (batch != m.B || length != m.L) {
    m.graph.forget();  // the buffers below (and the layers') move
    m.B = batch;
    m.L = length;
    for (auto* a : {&m.h0, &m.h1, &m.top}) Impl::ensure(*a, N * D);
    Impl::ensure(m.x, N * Di);
    Impl::ensure(m.mean, N);
    Impl::ensure(m.rstd, N);
    Impl::ensure(m.bn_mean, D);
    Impl::ensure(m.bn_invstd, D);
    Impl::ensure(m.pooled, static_cast<long long>(batch) * D);
    Impl::ensure(m.logits, static_cast<long long>(batch) * C);
    Impl::ensure(m.dlogits, static_cast<long long>(batch) * C);
    m.padding = DeviceArray<std::uint8_t>(static_cast<std::size_t>(N));
    m.counts = DeviceArray<int>(static_cast<std::size_t>(batch));
  }
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  SMA_CUDA_CHECK(cudaMemcpyAsync(m.x.data(), x, N * Di * sizeof(float), cudaMemcpyDeviceToDevice, s));
  m.has_padding = padding != nullptr;
  if (padding) SMA_CUDA_CHECK(cudaMemcpyAsync(m.padding.data(), padding, N, cudaMemcpyDeviceToDevice, s));
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  // encoder: h0 = x We^T + be
  detail::bias_rows(N, D, m.p("encoder.bias"), nullptr, m.h0.data(), s);
  detail::gemm_rm(m.blas, false, true, static_cast<int>(N), D, Di, m.x.data(), Di, m.p("encoder.weight"), Di, 1.f, m.h0.data(),
          D);
  // layers, ping-pong (each layer keeps its own copy of its input)
  float* cur = m.h0.data();
  float* nxt = m.h1.data();
  for (auto& l : m.layers) {
    l.forward(batch, length, cur, pad, nxt, stream);
    std::swap(cur, nxt);
  }
  // final norm (prenorm)
  const float* top = cur;
  m.bn_batch_stats = m.training;
  if (c.prenorm) {
    if (c.final_norm == NormKind::batchnorm)
      batchnorm_forward(N, D, c.norm_eps, m.training, c.norm_momentum, cur, m.p("final_norm.norm.weight"),
                        m.p("final_norm.norm.bias"), m.p("final_norm.norm.running_mean"),
                        m.p("final_norm.norm.running_var"),
                        m.training ? m.p("final_norm.norm.num_batches_tracked") : nullptr, m.top.data(),
                        m.bn_mean.data(), m.bn_invstd.data(), stream);
    else
      norm_forward(c.final_norm, N, D, c.norm_eps, cur, m.final_weight(), m.p("final_norm.norm.bias"), m.top.data(),
                   m.mean.data(), m.rstd.data(), stream);
    top = m.top.data();
  }
  m.last_layer_out = cur;
  // pooling and decoder
  pool_forward_kernel<<<dim3((D + 31) / 32, batch), dim3(32, kPoolRows), 0, s>>>(length, D, top, pad, m.pooled.data(),
                                                                                 m.counts.data());
  SMA_CUDA_CHECK_LAUNCH();
  detail::bias_rows(batch, C, m.p("decoder.bias"), nullptr, m.logits.data(), s);
  detail::gemm_rm(m.blas, false, true, batch, C, D, m.pooled.data(), D, m.p("decoder.weight"), D, 1.f, m.logits.data(), C);
  if (logits)
    SMA_CUDA_CHECK(cudaMemcpyAsync(logits, m.logits.data(), static_cast<long long>(batch) * C * sizeof(float),
                                   cudaMemcpyDeviceToDevice, s));
  m.has_forward = true;
}

void SeqBoatModelDevice::backward(const float* dlogits, float* dx, void* stream) {
  Impl& m = *impl_;
  if (!m.has_forward) throw ValueError("SeqBoatModelDevice::backward: no forward to differentiate");
  if (!dlogits) throw ValueError("SeqBoatModelDevice::backward: dlogits is null");
  const SeqBoatModelDeviceConfig& c = m.cfg;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int B = m.B, L = m.L, D = c.d_model, Di = c.d_input, C = c.d_output;
  const long long N = static_cast<long long>(B) * L;
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  detail::StreamWorkspace ws(s);
  m.grads_zero = false;
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  // decoder: dWd += dlogits^T pooled, dbd += colsum(dlogits), dpooled = dlogits Wd
  detail::gemm_rm(m.blas, true, false, C, D, B, dlogits, C, m.pooled.data(), D, 1.f, m.g("decoder.weight"), D);
  column_sum_add(B, C, dlogits, C, nullptr, m.g("decoder.bias"), stream);
  float* dpooled = ws.alloc<float>(static_cast<long long>(B) * D);
  detail::gemm_rm(m.blas, false, false, B, D, C, dlogits, C, m.p("decoder.weight"), D, 0.f, dpooled, D);
  // pooling, final norm
  float* da = ws.alloc<float>(N * D);
  float* db = ws.alloc<float>(N * D);
  pool_backward_kernel<<<grid(N * D), 256, 0, s>>>(N * D, L, D, dpooled, pad, m.counts.data(), da);
  SMA_CUDA_CHECK_LAUNCH();
  if (c.prenorm) {
    if (c.final_norm == NormKind::batchnorm)
      batchnorm_backward(N, D, m.bn_batch_stats, m.last_layer_out, m.p("final_norm.norm.weight"), m.bn_mean.data(),
                         m.bn_invstd.data(), da, db, m.g("final_norm.norm.weight"), m.g("final_norm.norm.bias"),
                         stream);
    else
      norm_backward(c.final_norm, N, D, m.last_layer_out, m.final_weight(), m.mean.data(), m.rstd.data(), da, db,
                    m.final_dweight(), m.g("final_norm.norm.bias"), stream);
    std::swap(da, db);
  }
  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    it->backward(da, db, stream);
    std::swap(da, db);
  }
  // encoder: dWe += dh^T x, dbe += colsum(dh), dx = dh We
  detail::gemm_rm(m.blas, true, false, D, Di, static_cast<int>(N), da, D, m.x.data(), Di, 1.f, m.g("encoder.weight"), Di);
  column_sum_add(N, D, da, D, nullptr, m.g("encoder.bias"), stream);
  if (dx) detail::gemm_rm(m.blas, false, false, static_cast<int>(N), Di, D, da, D, m.p("encoder.weight"), Di, 0.f, dx, Di);
}

void SeqBoatModelDevice::loss(const int* labels, int ignore, void* stream) {
  Impl& m = *impl_;
  if (!m.has_forward) throw ValueError("SeqBoatModelDevice::loss: no forward");
  if (!labels) throw ValueError("SeqBoatModelDevice::loss: labels is null");
  cross_entropy(m.B, m.cfg.d_output, m.logits.data(), labels, ignore, m.dlogits.data(), m.loss_result.data(), stream);
}

void SeqBoatModelDevice::backward_loss(float* dx, void* stream) { backward(impl_->dlogits.data(), dx, stream); }

CrossEntropyValue SeqBoatModelDevice::read_loss(void* stream) const {
  return CrossEntropyValue::from(impl_->loss_result.download(stream), impl_->cfg.d_output);
}

void SeqBoatModelDevice::zero_grad(void* stream) {
  impl_->params.zero_grad(static_cast<cudaStream_t>(stream));
  impl_->grads_zero = true;
}

void SeqBoatModelDevice::set_optimizer(const AdamWConfig& cfg) {
  impl_->graph.forget();
  impl_->opt.emplace(impl_->params.adamw_ranges(), cfg);
}

void SeqBoatModelDevice::set_optimizer(const DeviceOptimizerConfig& cfg) {
  impl_->graph.forget();
  impl_->opt.emplace(impl_->params.adamw_ranges(), cfg);
}

DeviceOptimizer& SeqBoatModelDevice::optimizer() {
  if (!impl_->opt) throw ValueError("SeqBoatModelDevice::optimizer: no optimiser (call set_optimizer first)");
  return *impl_->opt;
}

void SeqBoatModelDevice::step(double lr, void* stream) { optimizer().step(lr, stream); }

void SeqBoatModelDevice::train_step(int batch, int length, const float* x, const std::uint8_t* padding,
                                    const int* labels, double lr, void* stream) {
  Impl& m = *impl_;
  if (!m.opt) throw ValueError("SeqBoatModelDevice::train_step: no optimiser (call set_optimizer first)");
  if (!labels) throw ValueError("SeqBoatModelDevice::train_step: labels is null");
  if (!m.grads_zero) zero_grad(stream);
  if (!m.graph.enabled()) {
    forward(batch, length, x, padding, nullptr, stream);
    loss(labels, -100, stream);
    backward(m.dlogits.data(), nullptr, stream);
    m.opt->step(lr, stream, /*zero_grads=*/true);
    m.grads_zero = true;
    return;
  }
  if (!stream)
    throw ValueError("SeqBoatModelDevice::train_step: the step graph needs a stream (the legacy default stream "
                     "cannot be captured)");
  if (batch < 1 || length < 1 || !x)  // forward's checks, before a capture begins
    throw ValueError(str_cat("SeqBoatModelDevice::train_step: batch ", batch, ", length ", length, " and x ",
                             x ? "set" : "null", " (need >= 1, >= 1, set)"));
  std::vector<long long> shape{batch, length, padding != nullptr, m.training};
  for (int i = 0; i < n_layers(); ++i)
    detail::append_layer_shape(shape, m.layers[static_cast<std::size_t>(i)], "SeqBoatModelDevice::train_step", i);
  std::vector<long long> key = shape;
  key.insert(key.end(), {detail::key_of(x), detail::key_of(padding), detail::key_of(labels)});
  // The scalars of this step go to device memory outside the graph; the update inside reads them.
  m.opt->prepare_step(lr, stream);
  m.graph.run(static_cast<cudaStream_t>(stream), shape, key, [&] {
    forward(batch, length, x, padding, nullptr, stream);
    loss(labels, -100, stream);
    backward(m.dlogits.data(), nullptr, stream);
    m.opt->step_prepared(stream, /*zero_grads=*/true);
  });
  m.has_forward = true;
  m.grads_zero = true;
}

void SeqBoatModelDevice::set_step_graph(bool on) { impl_->graph.set_enabled(on); }
bool SeqBoatModelDevice::step_graph() const { return impl_->graph.enabled(); }
StepGraphStats SeqBoatModelDevice::step_graph_stats() const { return impl_->graph.stats(); }

std::vector<std::string> SeqBoatModelDevice::param_names() const { return impl_->params.names(); }

std::vector<float> SeqBoatModelDevice::param(const std::string& name, void* stream) const {
  return impl_->params.value(name, static_cast<cudaStream_t>(stream));
}

std::vector<float> SeqBoatModelDevice::grad(const std::string& name, void* stream) const {
  return impl_->params.grad(name, static_cast<cudaStream_t>(stream));
}

}  // namespace sma::cuda
