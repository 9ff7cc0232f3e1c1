// SeqBoatLayerStreamerDevice (include/sma/cuda/seqboat_stream_device.hpp): one streaming step of a causal SeqBoat
// layer for B streams as a chain of small kernels (stream_kernels.cuh) and three cuBLAS products, on one stream.
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/seqboat_stream_device.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/gemm.cuh"
#include "../common/workspace.cuh"
#include "stream_kernels.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace sma::cuda {

namespace {

/// The layer's weights as device pointers (resolved at every step, so a graph is re-captured if one moves).
struct Weights {
  const float *delta, *alpha, *beta, *gamma, *omega, *hx_w, *hx_b, *temp, *mx_w, *mx_b, *h_w, *h_b, *qk_gamma,
      *qk_beta, *table, *norm_w, *norm_b, *bn_mean, *bn_var;
  double router_shift;  // a double: no padding bytes in the struct
  bool operator==(const Weights& o) const { return std::memcmp(this, &o, sizeof(Weights)) == 0; }
};

Weights weights_of(const SeqBoatLayerDevice& L) {
  Weights w;
  std::memset(&w, 0, sizeof w);  // padding bytes too: operator== compares the bytes
  const SeqBoatDeviceConfig& c = L.config();
  // param_refs() is not const because it hands out the gradients for writing; only the values are read here.
  const std::vector<DeviceParamRef> refs = const_cast<SeqBoatLayerDevice&>(L).param_refs();
  auto find = [&](const char* n) -> const float* {
    for (const DeviceParamRef& r : refs)
      if (r.name == n) return r.value;
    return nullptr;
  };
  auto need = [&](const char* n) {
    const float* p = find(n);
    if (!p) throw ValueError(str_cat("SeqBoatLayerStreamerDevice: the layer has no parameter ", n));
    return p;
  };
  w.delta = need("ssm.delta");
  w.alpha = need("ssm.alpha");
  w.beta = need("ssm.beta");
  w.gamma = need("ssm.gamma");
  w.omega = need("ssm.omega");
  w.hx_w = need("hx_proj.weight");
  w.hx_b = need("hx_proj.bias");
  w.temp = need("q_router.temp");
  w.mx_w = need("mx_proj.weight");
  w.mx_b = need("mx_proj.bias");
  w.h_w = need("h_proj.weight");
  w.h_b = need("h_proj.bias");
  w.qk_gamma = need("gamma");
  w.qk_beta = need("beta");
  w.table = c.attention.bias_table_size() > 0 ? need("rel_pos_bias.rel_pos_bias") : nullptr;
  w.norm_w = find(c.norm == NormKind::scalenorm ? "norm.norm.scalar" : "norm.norm.weight");
  w.norm_b = find("norm.norm.bias");
  if (c.norm == NormKind::batchnorm) {
    w.bn_mean = need("norm.norm.running_mean");
    w.bn_var = need("norm.norm.running_var");
  }
  w.router_shift = c.router_shift;
  return w;
}

}  // namespace

struct SeqBoatLayerStreamerDevice::Impl {
  const SeqBoatLayerDevice* layer = nullptr;
  int B = 0, D = 0, N = 0, Z = 0, H = 0, W = 0, K = 0, ldh = 0;
  cublasHandle_t blas = nullptr;
  DeviceBuffer blas_workspace;  // given to cuBLAS, so that a capture never sees it allocate
  // state
  DeviceArray<float> ema, history, keys, values, last_gate;
  DeviceArray<std::int64_t> key_pos, position, activated;
  DeviceArray<std::uint8_t> last_active;
  // scratch of one step
  DeviceArray<float> xin, mean, rstd, bn_mean, bn_invstd, mx, hu, probs, gate, base, q, k, r, v, scores, hr, hc, act;
  DeviceArray<std::uint8_t> active;
  DeviceArray<float> host_x, host_y;  // step(std::vector)
  // graph
  bool graph_on = false;
  cudaStream_t capture_stream = nullptr;
  cudaGraphExec_t exec = nullptr;
  const float *graph_x = nullptr;
  float* graph_y = nullptr;
  Weights graph_w{};

  ~Impl() {
    if (exec) cudaGraphExecDestroy(exec);
    if (capture_stream) cudaStreamDestroy(capture_stream);
    if (blas) cublasDestroy(blas);
  }

  void norm(const Weights& w, const float* in, float* out, cudaStream_t s) {
    const SeqBoatDeviceConfig& c = layer->config();
    if (c.norm == NormKind::batchnorm)
      batchnorm_forward(B, D, c.norm_eps, false, c.norm_momentum, in, w.norm_w, w.norm_b, const_cast<float*>(w.bn_mean),
                        const_cast<float*>(w.bn_var), nullptr, out, bn_mean.data(), bn_invstd.data(), s);
    else
      norm_forward(c.norm, B, D, c.norm_eps, in, w.norm_w, w.norm_b, out, mean.data(), rstd.data(), s);
  }

  /// Queues one step on s (no host wait, nothing allocated: capturable).
  void enqueue(const Weights& w, const float* x, float* y, cudaStream_t s) {
    const SeqBoatDeviceConfig& c = layer->config();
    const int P = Z + 2 * H;
    stream::StepArgs a;
    a.B = B, a.D = D, a.N = N, a.Z = Z, a.H = H, a.W = W, a.K = K, a.ldh = ldh;
    a.position = static_cast<int>(c.attention.position);
    a.activation = static_cast<int>(c.attention.activation);
    a.max_positions = c.attention.max_positions;
    a.rotary_theta = c.attention.rotary_theta;
    a.query_scale = static_cast<float>(c.attention.activation == Activation::softmax ? 1.0 / std::sqrt(double(Z))
                                                                                       : 1.0 / double(W));
    a.delta = w.delta, a.alpha = w.alpha, a.beta = w.beta, a.gamma = w.gamma, a.omega = w.omega;
    a.hx_bias = w.hx_b, a.mx_bias = w.mx_b, a.qk_gamma = w.qk_gamma, a.qk_beta = w.qk_beta, a.h_bias = w.h_b;
    a.table = w.table;
    a.ema = ema.data(), a.history = history.data(), a.keys = keys.data(), a.values = values.data();
    a.key_pos = reinterpret_cast<long long*>(key_pos.data());
    a.pos = reinterpret_cast<long long*>(position.data());
    a.activated = reinterpret_cast<long long*>(activated.data());
    a.last_active = last_active.data(), a.last_gate = last_gate.data();
    a.x = x;
    a.xin = c.prenorm ? xin.data() : x;
    a.mx = mx.data(), a.hu = hu.data(), a.active = active.data(), a.gate = gate.data(), a.base = base.data();
    a.q = q.data(), a.k = k.data(), a.r = r.data(), a.v = v.data(), a.scores = scores.data(), a.hr = hr.data();
    a.hc = hc.data();
    a.out = c.prenorm ? y : act.data();

    if (c.prenorm) norm(w, x, xin.data(), s);
    stream::ema_step_kernel<<<detail::grid_for(static_cast<long long>(B) * D, stream::kThreads), stream::kThreads, 0,
                              s>>>(a);
    SMA_CUDA_CHECK_LAUNCH();
    SMA_CUDA_CHECK(cublasSetStream(blas, s));
    // [logits | hx] (B, 2+D) += mx hx_proj^T (hu holds the bias).
    detail::gemm_rm(blas, false, true, B, 2 + D, D, mx.data(), D, w.hx_w, D, 1.f, hu.data(), ldh);
    router_forward(B, 1, hu.data(), ldh, static_cast<float>(w.router_shift), w.temp, nullptr, probs.data(), active.data(), gate.data(), s);
    // mx_proj on every row: cuBLAS takes host shapes and the decisions stay on the device; inactive rows are
    // ignored downstream.
    detail::gemm_rm(blas, false, true, B, P, D, mx.data(), D, w.mx_w, D, 0.f, base.data(), P);
    stream::prep_kernel<<<B, stream::kThreads, 0, s>>>(a);
    SMA_CUDA_CHECK_LAUNCH();
    stream::score_kernel<<<dim3((W + 1 + stream::kScoreWarps - 1) / stream::kScoreWarps, B), stream::kThreads, 0,
                           s>>>(a);
    SMA_CUDA_CHECK_LAUNCH();
    stream::value_kernel<<<dim3((H + stream::kValueCols - 1) / stream::kValueCols, B), stream::kThreads, 0, s>>>(a);
    SMA_CUDA_CHECK_LAUNCH();
    detail::gemm_rm(blas, false, true, B, D, H, hr.data(), H, w.h_w, H, 0.f, hc.data(), D);
    stream::output_kernel<<<B, stream::kThreads, 0, s>>>(a);
    SMA_CUDA_CHECK_LAUNCH();
    if (!c.prenorm) norm(w, act.data(), y, s);
  }

  void drop_graph() {
    if (exec) cudaGraphExecDestroy(exec);
    exec = nullptr;
  }

  void step(const float* x, float* y, cudaStream_t s) {
    const Weights w = weights_of(*layer);
    if (!graph_on) {
      enqueue(w, x, y, s);
      return;
    }
    if (!exec || x != graph_x || y != graph_y || !(w == graph_w)) {
      drop_graph();
      if (!capture_stream) SMA_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream, cudaStreamNonBlocking));
      cudaGraph_t g = nullptr;
      SMA_CUDA_CHECK(cudaStreamBeginCapture(capture_stream, cudaStreamCaptureModeThreadLocal));
      try {
        enqueue(w, x, y, capture_stream);
      } catch (...) {
        cudaStreamEndCapture(capture_stream, &g);
        if (g) cudaGraphDestroy(g);
        throw;
      }
      SMA_CUDA_CHECK(cudaStreamEndCapture(capture_stream, &g));
      const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      SMA_CUDA_CHECK(e);
      graph_x = x;
      graph_y = y;
      graph_w = w;
    }
    SMA_CUDA_CHECK(cudaGraphLaunch(exec, s));
  }

  void reset_row(int b, cudaStream_t s) {
    auto zero = [&](void* base_ptr, std::size_t row_bytes) {
      if (row_bytes > 0)
        SMA_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(base_ptr) + row_bytes * b, 0, row_bytes, s));
    };
    zero(ema.data(), sizeof(float) * D * N);
    zero(history.data(), sizeof(float) * K * D);
    zero(keys.data(), sizeof(float) * W * Z);
    zero(values.data(), sizeof(float) * W * H);
    zero(key_pos.data(), sizeof(std::int64_t) * W);
    zero(position.data(), sizeof(std::int64_t));
    zero(activated.data(), sizeof(std::int64_t));
    zero(last_active.data(), 1);
    zero(last_gate.data(), sizeof(float));
  }
};

SeqBoatLayerStreamerDevice::SeqBoatLayerStreamerDevice(const SeqBoatLayerDevice& layer, int batch)
    : impl_(std::make_unique<Impl>()) {
  const SeqBoatDeviceConfig& c = layer.config();
  if (c.bidirectional)
    throw ValueError("SeqBoatLayerStreamerDevice: streaming needs a causal layer (a bidirectional layer looks ahead)");
  if (batch < 1 || batch > 65535)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice: batch must be in 1 .. 65535, got ", batch));
  if (c.attention.window < 1)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice: window must be >= 1, got ", c.attention.window));
  if (c.truncation < 0)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice: negative EMA truncation ", c.truncation));
  if (c.attention.position == Position::rotary && c.zdim % 2 != 0)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice: rotary positions need an even zdim, got ", c.zdim));
  if (c.attention.position == Position::simple && c.attention.max_positions < 1)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice: max_positions must be >= 1, got ",
                             c.attention.max_positions));
  Impl& m = *impl_;
  m.layer = &layer;
  m.B = batch, m.D = c.embed_dim, m.N = c.ndim, m.Z = c.zdim, m.H = c.hdim, m.W = c.attention.window;
  m.K = c.truncation;
  m.ldh = (2 + m.D + 7) / 8 * 8;
  (void)weights_of(layer);  // every parameter present
  const std::size_t B = static_cast<std::size_t>(batch), D = m.D, N = m.N, Z = m.Z, H = m.H, W = m.W, K = m.K;
  m.ema = DeviceArray<float>(B * D * N);
  m.history = DeviceArray<float>(B * K * D);
  m.keys = DeviceArray<float>(B * W * Z);
  m.values = DeviceArray<float>(B * W * H);
  m.last_gate = DeviceArray<float>(B);
  m.key_pos = DeviceArray<std::int64_t>(B * W);
  m.position = DeviceArray<std::int64_t>(B);
  m.activated = DeviceArray<std::int64_t>(B);
  m.last_active = DeviceArray<std::uint8_t>(B);
  for (auto* a : {&m.xin, &m.mx, &m.hc, &m.act, &m.host_x, &m.host_y}) *a = DeviceArray<float>(B * D);
  for (auto* a : {&m.mean, &m.rstd, &m.gate}) *a = DeviceArray<float>(B);
  m.bn_mean = DeviceArray<float>(D);
  m.bn_invstd = DeviceArray<float>(D);
  m.hu = DeviceArray<float>(B * m.ldh);
  m.probs = DeviceArray<float>(2 * B);
  m.base = DeviceArray<float>(B * (Z + 2 * H));
  m.q = DeviceArray<float>(B * Z);
  m.k = DeviceArray<float>(B * Z);
  for (auto* a : {&m.r, &m.v, &m.hr}) *a = DeviceArray<float>(B * H);
  m.scores = DeviceArray<float>(B * (W + 1));
  m.active = DeviceArray<std::uint8_t>(B);
  SMA_CUDA_CHECK(cublasCreate(&m.blas));
  m.blas_workspace = DeviceBuffer(std::size_t(4) << 20);
  SMA_CUDA_CHECK(cublasSetWorkspace(m.blas, m.blas_workspace.data(), m.blas_workspace.bytes()));
  reset(nullptr);
  SMA_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

SeqBoatLayerStreamerDevice::~SeqBoatLayerStreamerDevice() = default;
SeqBoatLayerStreamerDevice::SeqBoatLayerStreamerDevice(SeqBoatLayerStreamerDevice&&) noexcept = default;
SeqBoatLayerStreamerDevice& SeqBoatLayerStreamerDevice::operator=(SeqBoatLayerStreamerDevice&&) noexcept = default;

int SeqBoatLayerStreamerDevice::batch() const { return impl_->B; }
const SeqBoatLayerDevice& SeqBoatLayerStreamerDevice::layer() const { return *impl_->layer; }

void SeqBoatLayerStreamerDevice::step(const float* x, float* y, void* stream) {
  if (!x || !y) throw ValueError("SeqBoatLayerStreamerDevice::step: x or y is null");
  impl_->step(x, y, static_cast<cudaStream_t>(stream));
}

std::vector<float> SeqBoatLayerStreamerDevice::step(const std::vector<float>& x, void* stream) {
  Impl& m = *impl_;
  const std::size_t n = static_cast<std::size_t>(m.B) * m.D;
  if (x.size() != n)
    throw ShapeError(str_cat("SeqBoatLayerStreamerDevice::step: x_t has ", x.size(), " values, expected B x D = ", m.B,
                             " x ", m.D, " = ", n));
  m.host_x.upload(x, stream);
  step(m.host_x.data(), m.host_y.data(), stream);
  return m.host_y.download(stream);
}

void SeqBoatLayerStreamerDevice::set_graph(bool on) {
  impl_->graph_on = on;
  if (!on) impl_->drop_graph();
}
bool SeqBoatLayerStreamerDevice::graph() const { return impl_->graph_on; }

std::vector<unsigned char> SeqBoatLayerStreamerDevice::capture_key() const {
  const Weights w = weights_of(*impl_->layer);
  const auto* p = reinterpret_cast<const unsigned char*>(&w);
  return std::vector<unsigned char>(p, p + sizeof w);
}

void SeqBoatLayerStreamerDevice::reset_row(int b, void* stream) {
  if (b < 0 || b >= impl_->B)
    throw ValueError(str_cat("SeqBoatLayerStreamerDevice::reset_row: row ", b, " of ", impl_->B));
  impl_->reset_row(b, static_cast<cudaStream_t>(stream));
}

void SeqBoatLayerStreamerDevice::reset(void* stream) {
  Impl& m = *impl_;
  m.ema.fill_bytes(0, stream);
  m.history.fill_bytes(0, stream);
  m.keys.fill_bytes(0, stream);
  m.values.fill_bytes(0, stream);
  m.key_pos.fill_bytes(0, stream);
  m.position.fill_bytes(0, stream);
  m.activated.fill_bytes(0, stream);
  m.last_active.fill_bytes(0, stream);
  m.last_gate.fill_bytes(0, stream);
}

StreamStateArrays SeqBoatLayerStreamerDevice::download(void* stream) const {
  const Impl& m = *impl_;
  StreamStateArrays a;
  a.ema = m.ema.download(stream);
  a.ema_history = m.history.download(stream);
  a.keys = m.keys.download(stream);
  a.values = m.values.download(stream);
  a.key_positions = m.key_pos.download(stream);
  a.position = m.position.download(stream);
  a.activated = m.activated.download(stream);
  a.last_active = m.last_active.download(stream);
  a.last_gate = m.last_gate.download(stream);
  return a;
}

void SeqBoatLayerStreamerDevice::upload(const StreamStateArrays& a, void* stream) {
  Impl& m = *impl_;
  auto check = [](std::size_t got, std::size_t want, const char* what) {
    if (got != want)
      throw ShapeError(str_cat("SeqBoatLayerStreamerDevice::upload: ", what, " has ", got, " values, expected ", want));
  };
  check(a.ema.size(), m.ema.size(), "ema (B, D, N)");
  check(a.ema_history.size(), m.history.size(), "ema_history (B, K, D)");
  check(a.keys.size(), m.keys.size(), "keys (B, W, Z)");
  check(a.values.size(), m.values.size(), "values (B, W, H)");
  check(a.key_positions.size(), m.key_pos.size(), "key_positions (B, W)");
  check(a.position.size(), m.position.size(), "position (B)");
  check(a.activated.size(), m.activated.size(), "activated (B)");
  check(a.last_active.size(), m.last_active.size(), "last_active (B)");
  check(a.last_gate.size(), m.last_gate.size(), "last_gate (B)");
  for (std::size_t b = 0; b < a.position.size(); ++b)
    if (a.position[b] < 0 || a.activated[b] < 0 || a.activated[b] > a.position[b])
      throw ValueError(str_cat("SeqBoatLayerStreamerDevice::upload: row ", b, " has position ", a.position[b], " and ",
                               a.activated[b], " activated tokens (need 0 <= activated <= position)"));
  m.ema.upload(a.ema, stream);
  m.history.upload(a.ema_history, stream);
  m.keys.upload(a.keys, stream);
  m.values.upload(a.values, stream);
  m.key_pos.upload(a.key_positions, stream);
  m.position.upload(a.position, stream);
  m.activated.upload(a.activated, stream);
  m.last_active.upload(a.last_active, stream);
  m.last_gate.upload(a.last_gate, stream);
}

}  // namespace sma::cuda
