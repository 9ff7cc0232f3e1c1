// SeqBoatLmStreamerDevice (include/sma/cuda/seqboat_lm_stream_device.hpp): one decode step of the causal LM for B
// streams: the LM's row passes (lm_rows.cuh) around one SeqBoatLayerStreamerDevice per layer, and the tied head.
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/seqboat_lm_device.hpp>
#include <sma/cuda/seqboat_lm_stream_device.hpp>
#include <sma/cuda/seqboat_stream_device.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/gemm.cuh"
#include "../common/workspace.cuh"
#include "argmax_kernel.cuh"
#include "lm_rows.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda {

struct SeqBoatLmStreamerDevice::Impl {
  const SeqBoatLmDevice* lm = nullptr;
  int B = 0, D = 0, V = 0, F = 0;  // F: the feed-forward width (0 = no blocks)
  bool prenorm = true;
  NormKind norm = NormKind::layernorm;
  float eps = 1e-5f;
  detail::LmRowPasses rows;
  std::vector<SeqBoatLayerStreamerDevice> layers;
  cublasHandle_t blas = nullptr;
  DeviceBuffer blas_workspace;  // given to cuBLAS, so that a capture never sees it allocate
  // scratch of one step
  DeviceArray<float> h0, h1, top, mean, rstd, f_in1, f_pre, f_h, f_z, f_mean, f_rstd;
  DeviceArray<unsigned long long> bad_token;
  // host step / generate
  DeviceArray<int> tokens, gen_out, gen_bad;
  DeviceArray<float> logits;
  // graph
  bool graph_on = false, warm = false;
  cudaStream_t capture_stream = nullptr;
  cudaGraphExec_t exec = nullptr;
  std::vector<unsigned char> graph_key;

  ~Impl() {
    if (exec) cudaGraphExecDestroy(exec);
    if (capture_stream) cudaStreamDestroy(capture_stream);
    if (blas) cublasDestroy(blas);
  }

  /// Queues one step on s (no host wait, nothing allocated: capturable).
  void enqueue(const int* tok, float* out, cudaStream_t s) {
    SMA_CUDA_CHECK(cublasSetStream(blas, s));
    detail::embed_rows(B, D, V, rows.embed_scale, tok, nullptr, rows.embedding, h0.data(), bad_token.data(), s);
    float* cur = h0.data();
    float* nxt = h1.data();
    detail::FfnRowScratch t;
    t.in1 = f_in1.data(), t.pre = f_pre.data(), t.h = f_h.data(), t.z = f_z.data();
    t.mean = f_mean.data(), t.rstd = f_rstd.data();
    for (std::size_t i = 0; i < layers.size(); ++i) {
      layers[i].step(cur, nxt, s);
      std::swap(cur, nxt);
      if (!rows.ffns.empty()) {
        detail::ffn_forward_rows(blas, rows.ffns[i], B, cur, nxt, t, s);
        std::swap(cur, nxt);
      }
    }
    if (prenorm) {
      norm_forward(norm, B, D, eps, cur, rows.final_w, rows.final_b, top.data(), mean.data(), rstd.data(), s);
      cur = top.data();
    }
    // logits = top E^T (the head tied to the embedding)
    detail::gemm_rm(blas, false, true, B, V, D, cur, D, rows.embedding, D, 0.f, out, V);
  }

  std::vector<unsigned char> key_of(const int* tok, const float* out) const {
    std::vector<unsigned char> k(sizeof tok + sizeof out);
    std::memcpy(k.data(), &tok, sizeof tok);
    std::memcpy(k.data() + sizeof tok, &out, sizeof out);
    for (const SeqBoatLayerStreamerDevice& l : layers) {
      const std::vector<unsigned char> lk = l.capture_key();
      k.insert(k.end(), lk.begin(), lk.end());
    }
    return k;
  }

  void drop_graph() {
    if (exec) cudaGraphExecDestroy(exec);
    exec = nullptr;
    graph_key.clear();
  }

  void step(const int* tok, float* out, cudaStream_t s) {
    if (!graph_on || !warm) {
      enqueue(tok, out, s);
      warm = true;
      return;
    }
    std::vector<unsigned char> key = key_of(tok, out);
    if (!exec || key != graph_key) {
      drop_graph();
      if (!capture_stream) SMA_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream, cudaStreamNonBlocking));
      // Captured on a stream of its own (capturing nothing runs it), launched on s after what s already holds.
      cudaGraph_t g = nullptr;
      SMA_CUDA_CHECK(cudaStreamBeginCapture(capture_stream, cudaStreamCaptureModeThreadLocal));
      try {
        enqueue(tok, out, capture_stream);
      } catch (...) {
        cudaStreamEndCapture(capture_stream, &g);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        throw;
      }
      SMA_CUDA_CHECK(cudaStreamEndCapture(capture_stream, &g));
      const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      SMA_CUDA_CHECK(e);
      graph_key = std::move(key);
    }
    SMA_CUDA_CHECK(cudaGraphLaunch(exec, s));
  }

  void check_host_tokens(const std::vector<int>& tok, const char* where) const {
    if (static_cast<int>(tok.size()) != B)
      throw ShapeError(str_cat(where, ": ", tok.size(), " tokens, expected one per stream (B = ", B, ")"));
    for (std::size_t i = 0; i < tok.size(); ++i)
      if (tok[i] < 0 || tok[i] >= V)
        throw ValueError(str_cat(where, ": token ", tok[i], " of stream ", i, " is outside [0, ", V, ")"));
  }
};

SeqBoatLmStreamerDevice::SeqBoatLmStreamerDevice(const SeqBoatLmDevice& lm, int batch)
    : impl_(std::make_unique<Impl>()) {
  if (batch < 1 || batch > 65535)
    throw ValueError(str_cat("SeqBoatLmStreamerDevice: batch must be in 1 .. 65535, got ", batch));
  const SeqBoatLmDeviceConfig& c = lm.config();
  Impl& m = *impl_;
  m.lm = &lm;
  m.B = batch, m.D = c.d_model, m.V = c.vocab_size, m.F = c.ffn_hidden;
  m.prenorm = c.prenorm, m.norm = c.norm, m.eps = c.norm_eps;
  m.rows = detail::lm_row_passes(lm);
  for (int i = 0; i < lm.n_layers(); ++i) {
    if (lm.layer(i).config().bidirectional)  // the LM's constructor already refuses these
      throw ValueError(str_cat("SeqBoatLmStreamerDevice: layer ", i, " is bidirectional (streaming needs causal "
                               "layers)"));
    m.layers.emplace_back(lm.layer(i), batch);
  }
  const std::size_t B = static_cast<std::size_t>(batch), D = m.D, V = m.V, F = m.F;
  for (auto* a : {&m.h0, &m.h1, &m.top}) *a = DeviceArray<float>(B * D);
  for (auto* a : {&m.mean, &m.rstd, &m.f_mean, &m.f_rstd}) *a = DeviceArray<float>(B);
  if (F > 0) {
    m.f_in1 = DeviceArray<float>(B * D);
    m.f_z = DeviceArray<float>(B * D);
    m.f_pre = DeviceArray<float>(B * F);
    m.f_h = DeviceArray<float>(B * F);
  }
  m.bad_token = DeviceArray<unsigned long long>(std::vector<unsigned long long>{detail::kNoBadToken});
  m.tokens = DeviceArray<int>(B);
  m.gen_bad = DeviceArray<int>(1);
  m.logits = DeviceArray<float>(B * V);
  SMA_CUDA_CHECK(cublasCreate(&m.blas));
  m.blas_workspace = DeviceBuffer(std::size_t(4) << 20);
  SMA_CUDA_CHECK(cublasSetWorkspace(m.blas, m.blas_workspace.data(), m.blas_workspace.bytes()));
  SMA_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

SeqBoatLmStreamerDevice::~SeqBoatLmStreamerDevice() = default;
SeqBoatLmStreamerDevice::SeqBoatLmStreamerDevice(SeqBoatLmStreamerDevice&&) noexcept = default;
SeqBoatLmStreamerDevice& SeqBoatLmStreamerDevice::operator=(SeqBoatLmStreamerDevice&&) noexcept = default;

int SeqBoatLmStreamerDevice::batch() const { return impl_->B; }
int SeqBoatLmStreamerDevice::vocab_size() const { return impl_->V; }
const SeqBoatLmDevice& SeqBoatLmStreamerDevice::model() const { return *impl_->lm; }
const float* SeqBoatLmStreamerDevice::logits() const { return impl_->logits.data(); }
std::vector<float> SeqBoatLmStreamerDevice::download_logits(void* stream) const {
  return impl_->logits.download(stream);
}

void SeqBoatLmStreamerDevice::step(const int* tokens, float* logits, void* stream) {
  if (!tokens || !logits) throw ValueError("SeqBoatLmStreamerDevice::step: tokens or logits is null");
  impl_->step(tokens, logits, static_cast<cudaStream_t>(stream));
}

std::vector<float> SeqBoatLmStreamerDevice::step(const std::vector<int>& tokens, void* stream) {
  Impl& m = *impl_;
  m.check_host_tokens(tokens, "SeqBoatLmStreamerDevice::step");
  m.tokens.upload(tokens, stream);
  step(m.tokens.data(), m.logits.data(), stream);
  return m.logits.download(stream);
}

void SeqBoatLmStreamerDevice::check_tokens(void* stream) {
  Impl& m = *impl_;
  const unsigned long long b = m.bad_token.download(stream)[0];
  if (b == detail::kNoBadToken) return;
  m.bad_token.fill_bytes(0xff, stream);
  SMA_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  throw ValueError(str_cat("SeqBoatLmStreamerDevice: token ", static_cast<int>(static_cast<unsigned>(b & 0xffffffffULL)),
                           " of stream ", static_cast<long long>(b >> 32), " is outside [0, ", m.V,
                           ") (embedded as zeros)"));
}

std::vector<int> SeqBoatLmStreamerDevice::generate(const std::vector<int>& first, int n_steps, void* stream) {
  Impl& m = *impl_;
  if (n_steps < 1) throw ValueError(str_cat("SeqBoatLmStreamerDevice::generate: n_steps must be >= 1, got ", n_steps));
  m.check_host_tokens(first, "SeqBoatLmStreamerDevice::generate");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const std::size_t n = static_cast<std::size_t>(m.B) * n_steps;
  if (m.gen_out.size() != n) m.gen_out = DeviceArray<int>(n);
  m.tokens.upload(first, stream);
  SMA_CUDA_CHECK(cudaMemsetAsync(m.gen_bad.data(), 0x7f, sizeof(int), s));  // INT_MAX-like: no report
  for (int j = 0; j < n_steps; ++j) {
    step(m.tokens.data(), m.logits.data(), stream);
    lm::argmax_kernel<<<m.B, lm::kArgmaxThreads, 0, s>>>(m.B, m.V, n_steps, j, m.logits.data(), m.tokens.data(),
                                                  m.gen_out.data(), m.gen_bad.data());
    SMA_CUDA_CHECK_LAUNCH();
  }
  std::vector<int> out = m.gen_out.download(stream);
  const int bad = m.gen_bad.download(stream)[0];
  if (bad != 0x7f7f7f7f)
    throw NumericError(str_cat("SeqBoatLmStreamerDevice::generate: stream ", bad % m.B, " has a non-finite logit at "
                               "step ", bad / m.B));
  return out;
}

void SeqBoatLmStreamerDevice::set_graph(bool on) {
  impl_->graph_on = on;
  if (!on) impl_->drop_graph();
}
bool SeqBoatLmStreamerDevice::graph() const { return impl_->graph_on; }

void SeqBoatLmStreamerDevice::reset_row(int b, void* stream) {
  if (b < 0 || b >= impl_->B)
    throw ValueError(str_cat("SeqBoatLmStreamerDevice::reset_row: row ", b, " of ", impl_->B));
  for (SeqBoatLayerStreamerDevice& l : impl_->layers) l.reset_row(b, stream);
}

void SeqBoatLmStreamerDevice::reset(void* stream) {
  for (SeqBoatLayerStreamerDevice& l : impl_->layers) l.reset(stream);
  impl_->bad_token.fill_bytes(0xff, stream);
}

const SeqBoatLayerStreamerDevice& SeqBoatLmStreamerDevice::layer_streamer(int i) const {
  if (i < 0 || i >= static_cast<int>(impl_->layers.size()))
    throw ValueError(str_cat("SeqBoatLmStreamerDevice::layer_streamer: no layer ", i, " (the LM has ",
                             impl_->layers.size(), ")"));
  return impl_->layers[static_cast<std::size_t>(i)];
}

}  // namespace sma::cuda
