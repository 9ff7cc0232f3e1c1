// SeqBoatLmDevice (include/sma/cuda/seqboat_lm_device.hpp): token embedding, the causal layers with their
// feed-forward blocks, the final norm, the tied output projection and the token-level loss on one stream, with
// AdamW; nothing waits for the host unless a value is read back.
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/loss.hpp>
#include <sma/cuda/optimizer.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/seqboat_lm_device.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/gemm.cuh"
#include "../common/site_mask.cuh"
#include "../common/workspace.cuh"
#include "lm_rows.cuh"
#include "param_table.cuh"
#include "rows.cuh"
#include "step_graph.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda {
namespace {

using detail::kNoBadToken;
constexpr int kEmbedRows = 16;  // row groups of the embedding-gradient block (32 columns x 16)

unsigned grid(long long n) { return detail::grid_for(n, 256); }

// h (N, D) = scale * E[token] per row, 0 at padded rows and at tokens outside [0, V); the first bad token is kept
// in *bad as (row << 32 | token bits), the smallest row winning.
__global__ void embed_forward_kernel(long long n, int D, int V, float scale, const int* __restrict__ tokens,
                                     const std::uint8_t* __restrict__ pad, const float* __restrict__ E,
                                     float* __restrict__ h, unsigned long long* __restrict__ bad) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / D;
    const int c = static_cast<int>(i - row * D);
    const int t = tokens[row];
    const bool ok = t >= 0 && t < V;
    if (!ok && c == 0)
      atomicMin(bad, (static_cast<unsigned long long>(row) << 32) | static_cast<unsigned>(t));
    h[i] = ok && !(pad && pad[row]) ? scale * E[static_cast<long long>(t) * D + c] : 0.f;
  }
}

// Sort keys of the embedding's backward: the token, or V for a padded or bad token (a row nobody reads).
__global__ void token_keys_kernel(long long n, int V, const int* __restrict__ tokens,
                                  const std::uint8_t* __restrict__ pad, int* __restrict__ keys,
                                  int* __restrict__ rows) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int t = tokens[i];
    keys[i] = t < 0 || t >= V || (pad && pad[i]) ? V : t;
    rows[i] = static_cast<int>(i);
  }
}

__device__ long long lower_bound(const int* __restrict__ a, long long n, int v) {
  long long lo = 0, hi = n;
  while (lo < hi) {
    const long long mid = (lo + hi) / 2;
    if (a[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// dE[v, c] += scale * sum of dh[row, c] over the rows holding token v (sorted: ascending rows within a token).
// Block (32 columns, kEmbedRows groups) per (token, 32-column tile): group g sums rows g, g + 16, ... of the token's
// run, then the 16 partial sums are added in group order.
__global__ void embed_backward_kernel(long long n, int D, float scale, const int* __restrict__ sorted_keys,
                                      const int* __restrict__ sorted_rows, const float* __restrict__ dh,
                                      float* __restrict__ dE) {
  __shared__ float part[kEmbedRows][32];
  const int v = blockIdx.x;
  const int c = blockIdx.y * 32 + threadIdx.x, g = threadIdx.y;
  const long long lo = lower_bound(sorted_keys, n, v), hi = lower_bound(sorted_keys, n, v + 1);
  if (lo == hi) return;  // the same for the whole block
  float s = 0.f;
  if (c < D)
    for (long long k = lo + g; k < hi; k += kEmbedRows) s += dh[static_cast<long long>(sorted_rows[k]) * D + c];
  part[g][threadIdx.x] = s;
  __syncthreads();
  if (g == 0 && c < D) {
    float tot = 0.f;
    for (int k = 0; k < kEmbedRows; ++k) tot += part[k][threadIdx.x];
    dE[static_cast<long long>(v) * D + c] += scale * tot;
  }
}

// The CPU's float formulas (sma/layers/activation.hpp).
__device__ float activate(DeviceActivation a, float x) {
  switch (a) {
    case DeviceActivation::silu: return x * (1.f / (1.f + expf(-x)));
    case DeviceActivation::gelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752440f));
    case DeviceActivation::relu: return x > 0.f ? x : 0.f;
    case DeviceActivation::relu2: return x > 0.f ? x * x : 0.f;
    case DeviceActivation::identity: return x;
  }
  return x;
}

__device__ float activate_grad(DeviceActivation a, float x) {
  switch (a) {
    case DeviceActivation::silu: {
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f + x * (1.f - s));
    }
    case DeviceActivation::gelu: {
      const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752440f));
      const float pdf = expf(-0.5f * x * x) * 0.39894228040143267794f;
      return cdf + x * pdf;
    }
    case DeviceActivation::relu: return x > 0.f ? 1.f : 0.f;
    case DeviceActivation::relu2: return x > 0.f ? 2.f * x : 0.f;
    case DeviceActivation::identity: return 1.f;
  }
  return 1.f;
}

// y = f(x), times the block's hidden dropout mask when `dr` has a draw.
__global__ void activation_forward_kernel(long long n, DeviceActivation a, const float* __restrict__ x,
                                          float* __restrict__ y, DropoutArgs dr = {}) {
  const SiteMask mask(dr, DropoutSite::ffn_hidden);
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    y[i] = activate(a, x[i]) * mask(i);
}

// d *= f'(x) (and the hidden dropout mask), in place.
__global__ void activation_backward_kernel(long long n, DeviceActivation a, const float* __restrict__ x,
                                           float* __restrict__ d, DropoutArgs dr = {}) {
  const SiteMask mask(dr, DropoutSite::ffn_hidden);
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    d[i] *= mask(i) * activate_grad(a, x[i]);
}

// The block's output dropout: out = x + o * mask (forward), or out = d * mask (backward, x null).
__global__ void output_dropout_kernel(long long n, const float* __restrict__ x, const float* __restrict__ o,
                                      float* __restrict__ out, DropoutArgs dr) {
  const SiteMask mask(dr, DropoutSite::ffn_out);
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = (x ? x[i] : 0.f) + o[i] * mask(i);
}

void ensure(DeviceArray<float>& a, long long n) {
  if (static_cast<long long>(a.size()) != n) a = DeviceArray<float>(static_cast<std::size_t>(std::max(n, 1LL)));
}

// A normalised feed-forward block (sma::Ffn) whose parameters live in the model's table under `prefix`; its
// forward is the row pass ffn_forward_rows on copies it keeps for the backward, or, with dropout in training, the
// same pass with the masks (hidden: after the activation; output: on fc2's output before the residual).
struct FfnBlock : detail::FfnRowPass {
  float *dnw = nullptr, *dnb = nullptr, *dw1 = nullptr, *db1 = nullptr, *dw2 = nullptr, *db2 = nullptr;
  long long rows = 0;
  DeviceArray<float> x, in1, pre, h, z, mean, rstd;  // x: the input; in1: fc1's input (prenorm: norm(x)); z: x + o
  float p_out = 0.f, p_hidden = 0.f;  // the dropout rates (SeqBoatLmDeviceConfig::dropout, activation_dropout)
  std::uint64_t seed = 0;
  DeviceArray<std::uint64_t> draw{std::vector<std::uint64_t>{0}};
  bool dropout_on = false;  // the last forward drew masks
  DropoutArgs out_args() const { return dropout_on ? dropout_args(seed, draw.data(), p_out) : DropoutArgs{}; }
  DropoutArgs hidden_args() const { return dropout_on ? dropout_args(seed, draw.data(), p_hidden) : DropoutArgs{}; }

  void resize(long long n) {
    if (n == rows) return;
    rows = n;
    ensure(x, n * D);
    ensure(pre, n * H);
    ensure(h, n * H);
    ensure(mean, n);
    ensure(rstd, n);
    ensure(prenorm ? in1 : z, n * D);
  }
  const float* fc1_input() const { return prenorm ? in1.data() : x.data(); }

  // y (rows, D) from x (rows, D); y may not alias x.
  void forward(cublasHandle_t blas, long long n, const float* xin, float* y, bool training, cudaStream_t s) {
    resize(n);
    SMA_CUDA_CHECK(cudaMemcpyAsync(x.data(), xin, n * D * sizeof(float), cudaMemcpyDeviceToDevice, s));
    dropout_on = training && (p_out > 0.f || p_hidden > 0.f);
    if (dropout_on) {
      advance_draw_kernel<<<1, 1, 0, s>>>(draw.data());
      SMA_CUDA_CHECK_LAUNCH();
    }
    detail::StreamWorkspace ws(s);
    detail::FfnRowScratch t;
    t.in1 = prenorm ? in1.data() : nullptr;
    t.z = prenorm ? nullptr : z.data();
    t.pre = pre.data();
    t.h = h.data();
    t.mean = mean.data();
    t.rstd = rstd.data();
    t.o = out_args().draw ? ws.alloc<float>(n * D) : nullptr;
    detail::ffn_forward_rows(blas, *this, n, x.data(), y, t, s, hidden_args(), out_args());
  }

  // dx (rows, D) from dy (rows, D) of the last forward (dx may not alias dy); parameter gradients ADDED.
  void backward(cublasHandle_t blas, const float* dy, float* dx, cudaStream_t s) {
    const long long n = rows;
    const int N = static_cast<int>(n);
    detail::StreamWorkspace ws(s);
    const float* dz = dy;  // gradient at the residual sum
    if (!prenorm) {
      float* t = ws.alloc<float>(n * D);
      norm_backward(norm, n, D, z.data(), nw, mean.data(), rstd.data(), dy, t, dnw, dnb, s);
      dz = t;
    }
    const float* dout = dz;  // gradient at fc2's output: dz through the output dropout
    if (dropout_on && p_out > 0.f) {
      float* t = ws.alloc<float>(n * D);
      output_dropout_kernel<<<grid(n * D), 256, 0, s>>>(n * D, nullptr, dz, t, out_args());
      SMA_CUDA_CHECK_LAUNCH();
      dout = t;
    }
    detail::gemm_rm(blas, true, false, D, H, N, dout, D, h.data(), H, 1.f, dw2, H);
    column_sum_add(n, D, dout, D, nullptr, db2, s);
    float* dpre = ws.alloc<float>(n * H);
    detail::gemm_rm(blas, false, false, N, H, D, dout, D, w2, H, 0.f, dpre, H);
    activation_backward_kernel<<<grid(n * H), 256, 0, s>>>(n * H, act, pre.data(), dpre, hidden_args());
    SMA_CUDA_CHECK_LAUNCH();
    detail::gemm_rm(blas, true, false, H, D, N, dpre, H, fc1_input(), D, 1.f, dw1, D);
    column_sum_add(n, H, dpre, H, nullptr, db1, s);
    if (prenorm) {
      float* dx1 = ws.alloc<float>(n * D);
      detail::gemm_rm(blas, false, false, N, D, H, dpre, H, w1, D, 0.f, dx1, D);
      norm_backward(norm, n, D, x.data(), nw, mean.data(), rstd.data(), dx1, dx, dnw, dnb, s, /*residual=*/dz);
    } else {
      SMA_CUDA_CHECK(cudaMemcpyAsync(dx, dz, n * D * sizeof(float), cudaMemcpyDeviceToDevice, s));
      detail::gemm_rm(blas, false, false, N, D, H, dpre, H, w1, D, 1.f, dx, D);
    }
  }
};

const char* norm_weight_name(NormKind k) { return k == NormKind::scalenorm ? "norm.norm.scalar" : "norm.norm.weight"; }

}  // namespace

namespace detail {

/// Layer i's feed-forward block of an LM configured as c, its parameters found by name with `param` (the norm's bias
/// only for layernorm): the same pass for the model's blocks and the streamer's.
template <class Lookup>
FfnRowPass ffn_row_pass(const SeqBoatLmDeviceConfig& c, int i, Lookup&& param) {
  const std::string pre = str_cat("decoder.layers.", i, ".nffn.");
  FfnRowPass f;
  f.D = c.d_model;
  f.H = c.ffn_hidden;
  f.prenorm = c.prenorm;
  f.norm = c.norm;
  f.eps = c.norm_eps;
  f.act = c.activation;
  f.nw = param(pre + norm_weight_name(c.norm));
  f.nb = c.norm == NormKind::layernorm ? param(pre + "norm.norm.bias") : nullptr;
  f.w1 = param(pre + "fc1.weight");
  f.b1 = param(pre + "fc1.bias");
  f.w2 = param(pre + "fc2.weight");
  f.b2 = param(pre + "fc2.bias");
  return f;
}

void embed_rows(long long rows, int D, int V, float scale, const int* tokens, const std::uint8_t* pad,
                const float* E, float* h, unsigned long long* bad, cudaStream_t s) {
  const long long n = rows * D;
  if (n <= 0) return;
  embed_forward_kernel<<<grid(n), 256, 0, s>>>(n, D, V, scale, tokens, pad, E, h, bad);
  SMA_CUDA_CHECK_LAUNCH();
}

void ffn_forward_rows(cublasHandle_t blas, const FfnRowPass& f, long long rows, const float* x, float* y,
                      const FfnRowScratch& t, cudaStream_t s, const DropoutArgs& hidden, const DropoutArgs& out) {
  if (rows <= 0) return;
  const int N = static_cast<int>(rows);
  const float* fc1_in = x;
  if (f.prenorm) {
    norm_forward(f.norm, rows, f.D, f.eps, x, f.nw, f.nb, t.in1, t.mean, t.rstd, s);
    fc1_in = t.in1;
  }
  bias_rows(rows, f.H, f.b1, nullptr, t.pre, s);
  gemm_rm(blas, false, true, N, f.H, f.D, fc1_in, f.D, f.w1, f.D, 1.f, t.pre, f.H);
  activation_forward_kernel<<<grid(rows * f.H), 256, 0, s>>>(rows * f.H, f.act, t.pre, t.h, hidden);
  SMA_CUDA_CHECK_LAUNCH();
  float* o = f.prenorm ? y : t.z;  // o = x + b2 + h W2^T, or x + (b2 + h W2^T) * mask
  if (out.draw) {
    bias_rows(rows, f.D, f.b2, nullptr, t.o, s);
    gemm_rm(blas, false, true, N, f.D, f.H, t.h, f.H, f.w2, f.H, 1.f, t.o, f.D);
    output_dropout_kernel<<<grid(rows * f.D), 256, 0, s>>>(rows * f.D, x, t.o, o, out);
    SMA_CUDA_CHECK_LAUNCH();
  } else {
    bias_rows(rows, f.D, f.b2, x, o, s);
    gemm_rm(blas, false, true, N, f.D, f.H, t.h, f.H, f.w2, f.H, 1.f, o, f.D);
  }
  if (!f.prenorm) norm_forward(f.norm, rows, f.D, f.eps, t.z, f.nw, f.nb, y, t.mean, t.rstd, s);
}

LmRowPasses lm_row_passes(const SeqBoatLmDevice& lm) {
  const SeqBoatLmDeviceConfig& c = lm.config();
  LmRowPasses r;
  r.embedding = lm.param_data("decoder.embed_tokens.weight");
  r.embed_scale = c.embed_scale;
  auto norm_of = [&](const std::string& prefix, const float*& w, const float*& b) {
    w = lm.param_data(prefix + norm_weight_name(c.norm));
    b = c.norm == NormKind::layernorm ? lm.param_data(prefix + "norm.norm.bias") : nullptr;
  };
  for (int i = 0; c.ffn_hidden > 0 && i < lm.n_layers(); ++i)
    r.ffns.push_back(ffn_row_pass(c, i, [&](const std::string& n) { return lm.param_data(n); }));
  if (c.prenorm) norm_of("decoder.final_", r.final_w, r.final_b);
  return r;
}

}  // namespace detail

struct SeqBoatLmDevice::Impl {
  SeqBoatLmDeviceConfig cfg;
  std::vector<SeqBoatLayerDevice> layers;
  std::vector<FfnBlock> ffns;
  cublasHandle_t blas = nullptr;
  detail::ParamTable params{"SeqBoatLmDevice"};  // embedding, nffn., final norm owned; every one listed
  bool training = true;
  std::optional<DeviceOptimizer> opt;
  bool grads_zero = true;  ///< host-side knowledge that every gradient is 0 (train_step skips zero_grad)

  int B = 0, L = 0;
  bool has_forward = false, has_padding = false;
  const float* last_out = nullptr;  ///< the final norm's input
  DeviceArray<float> h0, h1, top, mean, rstd, logits, dlogits;
  DeviceArray<int> tokens, keys, rows, sorted_keys, sorted_rows;
  DeviceArray<std::uint8_t> padding, sort_temp;
  DeviceArray<unsigned long long> bad_token;
  DeviceArray<double> loss_result;
  detail::StepGraph graph;

  ~Impl() {
    if (blas) cublasDestroy(blas);
  }
  const float* embedding() const { return params.p("decoder.embed_tokens.weight"); }
  float* dembedding() const { return params.g("decoder.embed_tokens.weight"); }
  const float* final_weight() const { return params.p(str_cat("decoder.final_", norm_weight_name(cfg.norm))); }
  float* final_dweight() const { return params.g(str_cat("decoder.final_", norm_weight_name(cfg.norm))); }
  int sort_bits() const {
    int bits = 1;
    while (bits < 31 && (1LL << bits) <= cfg.vocab_size) ++bits;  // keys up to V inclusive
    return bits;
  }
  void throw_if_bad_token(cudaStream_t s) const {
    const std::vector<unsigned long long> b = bad_token.download(s);
    if (b[0] == kNoBadToken) return;
    throw ValueError(str_cat("SeqBoatLmDevice: token ", static_cast<int>(static_cast<unsigned>(b[0] & 0xffffffffULL)),
                             " at flat index ", static_cast<long long>(b[0] >> 32), " is outside [0, ",
                             cfg.vocab_size, ")"));
  }
};

SeqBoatLmDevice::SeqBoatLmDevice(const SeqBoatLmDeviceConfig& cfg, std::vector<SeqBoatLayerDevice> layers,
                                 const std::vector<std::pair<std::string, std::vector<float>>>& params,
                                 const std::vector<DeviceParamInfo>& info)
    : impl_(std::make_unique<Impl>()) {
  if (cfg.vocab_size < 1 || cfg.d_model < 1 || cfg.ffn_hidden < 0)
    throw ValueError(str_cat("SeqBoatLmDevice: vocab_size and d_model must be >= 1 and ffn_hidden >= 0, got ",
                             cfg.vocab_size, ", ", cfg.d_model, ", ", cfg.ffn_hidden));
  if (cfg.norm == NormKind::batchnorm)
    throw ValueError("SeqBoatLmDevice: batchnorm is not supported (layernorm, rmsnorm or scalenorm)");
  Impl& m = *impl_;
  m.cfg = cfg;
  m.layers = std::move(layers);
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    if (m.layers[i].config().embed_dim != cfg.d_model)
      throw ShapeError(str_cat("SeqBoatLmDevice: layer ", i, " has embed_dim ", m.layers[i].config().embed_dim,
                               ", the model d_model ", cfg.d_model));
    if (m.layers[i].config().bidirectional)
      throw ValueError(str_cat("SeqBoatLmDevice: layer ", i, " is bidirectional (an LM's layers are causal)"));
  }
  const long long D = cfg.d_model, V = cfg.vocab_size, H = cfg.ffn_hidden;
  const long long nw = cfg.norm == NormKind::scalenorm ? 1 : D;
  std::map<std::string, long long> expected = {{"decoder.embed_tokens.weight", V * D}};
  auto expect_norm = [&](const std::string& pre) {
    expected[pre + norm_weight_name(cfg.norm)] = nw;
    if (cfg.norm == NormKind::layernorm) expected[pre + "norm.norm.bias"] = D;
  };
  if (cfg.prenorm) expect_norm("decoder.final_");
  for (std::size_t i = 0; H > 0 && i < m.layers.size(); ++i) {
    const std::string pre = str_cat("decoder.layers.", i, ".nffn.");
    expect_norm(pre);
    expected[pre + "fc1.weight"] = H * D;
    expected[pre + "fc1.bias"] = H;
    expected[pre + "fc2.weight"] = D * H;
    expected[pre + "fc2.bias"] = D;
  }
  for (const auto& [name, vals] : params) {
    auto it = expected.find(name);
    if (it == expected.end())
      throw ValueError(str_cat("SeqBoatLmDevice: unexpected parameter ", name));
    if (static_cast<long long>(vals.size()) != it->second)
      throw ShapeError(str_cat("SeqBoatLmDevice: parameter ", name, " has ", vals.size(), " values, expected ",
                               it->second));
    m.params.own(name, vals);
  }
  for (const auto& [name, n] : expected)
    if (!m.params.owns(name)) throw ValueError(str_cat("SeqBoatLmDevice: parameter ", name, " is missing"));
  for (std::size_t i = 0; H > 0 && i < m.layers.size(); ++i) {
    const std::string pre = str_cat("decoder.layers.", i, ".nffn.");
    FfnBlock f;
    static_cast<detail::FfnRowPass&>(f) =
        detail::ffn_row_pass(cfg, static_cast<int>(i), [&](const std::string& n) { return m.params.p(n); });
    f.dnw = m.params.g(pre + norm_weight_name(cfg.norm));
    f.dnb = m.params.g(pre + "norm.norm.bias");
    f.dw1 = m.params.g(pre + "fc1.weight");
    f.db1 = m.params.g(pre + "fc1.bias");
    f.dw2 = m.params.g(pre + "fc2.weight");
    f.db2 = m.params.g(pre + "fc2.bias");
    f.p_out = cfg.dropout;
    f.p_hidden = cfg.activation_dropout;
    m.ffns.push_back(std::move(f));
  }
  std::map<std::string, DeviceParamRef> layer_refs;
  for (std::size_t i = 0; i < m.layers.size(); ++i)
    for (DeviceParamRef r : m.layers[i].param_refs()) {
      r.name = str_cat("decoder.layers.", i, ".slag_layer.", r.name);
      layer_refs.emplace(r.name, r);
    }
  m.params.bind(info, layer_refs);
  m.loss_result = DeviceArray<double>(std::vector<double>{0, 0, 0, -1, 0});  // no loss yet, no bad target
  m.bad_token = DeviceArray<unsigned long long>(std::vector<unsigned long long>{kNoBadToken});
  SMA_CUDA_CHECK(cublasCreate(&m.blas));
  set_training(true);
  set_dropout_seed(0);
}

SeqBoatLmDevice::~SeqBoatLmDevice() = default;
SeqBoatLmDevice::SeqBoatLmDevice(SeqBoatLmDevice&&) noexcept = default;
SeqBoatLmDevice& SeqBoatLmDevice::operator=(SeqBoatLmDevice&&) noexcept = default;

const SeqBoatLmDeviceConfig& SeqBoatLmDevice::config() const { return impl_->cfg; }
int SeqBoatLmDevice::n_layers() const { return static_cast<int>(impl_->layers.size()); }
SeqBoatLayerDevice& SeqBoatLmDevice::layer(int i) {
  if (i < 0 || i >= n_layers()) throw ValueError(str_cat("SeqBoatLmDevice::layer: no layer ", i));
  return impl_->layers[static_cast<std::size_t>(i)];
}
const SeqBoatLayerDevice& SeqBoatLmDevice::layer(int i) const {
  return const_cast<SeqBoatLmDevice*>(this)->layer(i);
}
void SeqBoatLmDevice::set_training(bool on) {
  if (on != impl_->training) impl_->graph.forget();
  impl_->training = on;
  for (auto& l : impl_->layers) l.set_training(on);
}
bool SeqBoatLmDevice::training() const { return impl_->training; }
void SeqBoatLmDevice::set_dropout_seed(std::uint64_t seed, void* stream) {
  // Every layer and block its own seed, so that no two draw the same masks.
  Impl& m = *impl_;
  for (std::size_t i = 0; i < m.layers.size(); ++i)
    m.layers[i].set_dropout_seed(dropout_mix(seed ^ dropout_mix(2 * i + 1)), stream);
  for (std::size_t i = 0; i < m.ffns.size(); ++i) {
    m.ffns[i].seed = dropout_mix(seed ^ dropout_mix(2 * i + 2));
    m.ffns[i].draw.fill_bytes(0, stream);
  }
}
void SeqBoatLmDevice::set_bf16_projections(bool on) {
  if (on != (impl_->layers.empty() ? false : impl_->layers[0].config().bf16_projections)) {
    impl_->has_forward = false;
    impl_->graph.forget();
  }
  for (auto& l : impl_->layers) l.set_bf16_projections(on);
}
void SeqBoatLmDevice::set_bf16_attention(bool on) {
  if (on != (impl_->layers.empty() ? false : impl_->layers[0].config().attention.bf16)) {
    impl_->has_forward = false;
    impl_->graph.forget();
  }
  for (auto& l : impl_->layers) l.set_bf16_attention(on);
}
const float* SeqBoatLmDevice::logits() const { return impl_->logits.data(); }

void SeqBoatLmDevice::forward(int batch, int length, const int* tokens, const std::uint8_t* padding, float* logits,
                              void* stream) {
  if (batch < 1 || length < 1)
    throw ValueError(str_cat("SeqBoatLmDevice::forward: batch ", batch, " and length ", length, " must be >= 1"));
  if (!tokens) throw ValueError("SeqBoatLmDevice::forward: tokens is null");
  Impl& m = *impl_;
  const SeqBoatLmDeviceConfig& c = m.cfg;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const long long N = static_cast<long long>(batch) * length;
  if (N > INT_MAX / 2)
    throw ValueError(str_cat("SeqBoatLmDevice::forward: ", N, " tokens are too many for one call"));
  const int D = c.d_model, V = c.vocab_size;
  m.has_forward = false;
  if (batch != m.B || length != m.L) {
    m.graph.forget();  // the buffers below (and the layers' and blocks') move
    m.B = batch;
    m.L = length;
    for (auto* a : {&m.h0, &m.h1, &m.top}) ensure(*a, N * D);
    ensure(m.mean, N);
    ensure(m.rstd, N);
    ensure(m.logits, N * V);
    ensure(m.dlogits, N * V);
    for (auto* a : {&m.tokens, &m.keys, &m.rows, &m.sorted_keys, &m.sorted_rows})
      *a = DeviceArray<int>(static_cast<std::size_t>(N));
    m.padding = DeviceArray<std::uint8_t>(static_cast<std::size_t>(N));
    std::size_t bytes = 0;
    SMA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, m.keys.data(), m.sorted_keys.data(),
                                                   m.rows.data(), m.sorted_rows.data(), static_cast<int>(N), 0,
                                                   m.sort_bits(), s));
    m.sort_temp = DeviceArray<std::uint8_t>(std::max<std::size_t>(bytes, 1));
  }
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  SMA_CUDA_CHECK(cudaMemcpyAsync(m.tokens.data(), tokens, N * sizeof(int), cudaMemcpyDeviceToDevice, s));
  m.has_padding = padding != nullptr;
  if (padding) SMA_CUDA_CHECK(cudaMemcpyAsync(m.padding.data(), padding, N, cudaMemcpyDeviceToDevice, s));
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  SMA_CUDA_CHECK(cudaMemsetAsync(m.bad_token.data(), 0xff, sizeof(unsigned long long), s));
  detail::embed_rows(N, D, V, c.embed_scale, m.tokens.data(), pad, m.embedding(), m.h0.data(), m.bad_token.data(), s);
  // layers and blocks, ping-pong (each keeps its own copy of its input)
  float* cur = m.h0.data();
  float* nxt = m.h1.data();
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    m.layers[i].forward(batch, length, cur, pad, nxt, stream);
    std::swap(cur, nxt);
    if (!m.ffns.empty()) {
      m.ffns[i].forward(m.blas, N, cur, nxt, m.training, s);
      std::swap(cur, nxt);
    }
  }
  m.last_out = cur;
  if (c.prenorm)
    norm_forward(c.norm, N, D, c.norm_eps, cur, m.final_weight(), m.params.p("decoder.final_norm.norm.bias"),
                 m.top.data(), m.mean.data(), m.rstd.data(), stream);
  else
    SMA_CUDA_CHECK(cudaMemcpyAsync(m.top.data(), cur, N * D * sizeof(float), cudaMemcpyDeviceToDevice, s));
  detail::zero_padded_rows(N, D, pad, m.top.data(), s);
  // logits = top E^T
  detail::gemm_rm(m.blas, false, true, static_cast<int>(N), V, D, m.top.data(), D, m.embedding(), D, 0.f,
                  m.logits.data(), V);
  if (logits)
    SMA_CUDA_CHECK(cudaMemcpyAsync(logits, m.logits.data(), N * V * sizeof(float), cudaMemcpyDeviceToDevice, s));
  m.has_forward = true;
}

void SeqBoatLmDevice::backward(const float* dlogits, void* stream) {
  Impl& m = *impl_;
  if (!m.has_forward) throw ValueError("SeqBoatLmDevice::backward: no forward to differentiate");
  if (!dlogits) throw ValueError("SeqBoatLmDevice::backward: dlogits is null");
  const SeqBoatLmDeviceConfig& c = m.cfg;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int D = c.d_model, V = c.vocab_size;
  const long long N = static_cast<long long>(m.B) * m.L;
  SMA_CUDA_CHECK(cublasSetStream(m.blas, s));
  detail::StreamWorkspace ws(s);
  m.grads_zero = false;
  const std::uint8_t* pad = m.has_padding ? m.padding.data() : nullptr;
  // output projection: dE += dlogits^T top, dtop = dlogits E
  detail::gemm_rm(m.blas, true, false, V, D, static_cast<int>(N), dlogits, V, m.top.data(), D, 1.f, m.dembedding(),
                  D);
  float* da = ws.alloc<float>(N * D);
  float* db = ws.alloc<float>(N * D);
  detail::gemm_rm(m.blas, false, false, static_cast<int>(N), D, V, dlogits, V, m.embedding(), D, 0.f, da, D);
  detail::zero_padded_rows(N, D, pad, da, s);
  if (c.prenorm) {
    norm_backward(c.norm, N, D, m.last_out, m.final_weight(), m.mean.data(), m.rstd.data(), da, db, m.final_dweight(),
                  m.params.g("decoder.final_norm.norm.bias"), stream);
    std::swap(da, db);
  }
  for (std::size_t i = m.layers.size(); i-- > 0;) {
    if (!m.ffns.empty()) {
      m.ffns[i].backward(m.blas, da, db, s);
      std::swap(da, db);
    }
    m.layers[i].backward(da, db, stream);
    std::swap(da, db);
  }
  // embedding: the rows grouped by token (stable sort), each token's rows summed in row order
  token_keys_kernel<<<grid(N), 256, 0, s>>>(N, V, m.tokens.data(), pad, m.keys.data(), m.rows.data());
  SMA_CUDA_CHECK_LAUNCH();
  std::size_t bytes = m.sort_temp.size();
  SMA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(m.sort_temp.data(), bytes, m.keys.data(), m.sorted_keys.data(),
                                                 m.rows.data(), m.sorted_rows.data(), static_cast<int>(N), 0,
                                                 m.sort_bits(), s));
  embed_backward_kernel<<<dim3(V, (D + 31) / 32), dim3(32, kEmbedRows), 0, s>>>(
      N, D, c.embed_scale, m.sorted_keys.data(), m.sorted_rows.data(), da, m.dembedding());
  SMA_CUDA_CHECK_LAUNCH();
}

void SeqBoatLmDevice::loss(const int* targets, int ignore, void* stream) {
  Impl& m = *impl_;
  if (!m.has_forward) throw ValueError("SeqBoatLmDevice::loss: no forward");
  if (!targets) throw ValueError("SeqBoatLmDevice::loss: targets is null");
  cross_entropy(m.B * m.L, m.cfg.vocab_size, m.logits.data(), targets, ignore, m.dlogits.data(), m.loss_result.data(),
                stream);
}

void SeqBoatLmDevice::backward_loss(void* stream) { backward(impl_->dlogits.data(), stream); }

CrossEntropyValue SeqBoatLmDevice::read_loss(void* stream) const {
  impl_->throw_if_bad_token(static_cast<cudaStream_t>(stream));
  return CrossEntropyValue::from(impl_->loss_result.download(stream), impl_->cfg.vocab_size);
}

void SeqBoatLmDevice::check_tokens(void* stream) const {
  impl_->throw_if_bad_token(static_cast<cudaStream_t>(stream));
}

void SeqBoatLmDevice::zero_grad(void* stream) {
  impl_->params.zero_grad(static_cast<cudaStream_t>(stream));
  impl_->grads_zero = true;
}

void SeqBoatLmDevice::set_optimizer(const AdamWConfig& cfg) {
  impl_->graph.forget();
  impl_->opt.emplace(impl_->params.adamw_ranges(), cfg);
}

void SeqBoatLmDevice::set_optimizer(const DeviceOptimizerConfig& cfg) {
  impl_->graph.forget();
  impl_->opt.emplace(impl_->params.adamw_ranges(), cfg);
}

DeviceOptimizer& SeqBoatLmDevice::optimizer() {
  if (!impl_->opt) throw ValueError("SeqBoatLmDevice::optimizer: no optimiser (call set_optimizer first)");
  return *impl_->opt;
}

void SeqBoatLmDevice::step(double lr, void* stream) { optimizer().step(lr, stream); }

void SeqBoatLmDevice::train_step(int batch, int length, const int* tokens, const std::uint8_t* padding,
                                 const int* targets, double lr, void* stream) {
  Impl& m = *impl_;
  if (!m.opt) throw ValueError("SeqBoatLmDevice::train_step: no optimiser (call set_optimizer first)");
  if (!targets) throw ValueError("SeqBoatLmDevice::train_step: targets is null");
  if (!m.grads_zero) zero_grad(stream);
  if (!m.graph.enabled()) {
    forward(batch, length, tokens, padding, nullptr, stream);
    loss(targets, -100, stream);
    backward(m.dlogits.data(), stream);
    m.opt->step(lr, stream, /*zero_grads=*/true);
    m.grads_zero = true;
    return;
  }
  if (!stream)
    throw ValueError("SeqBoatLmDevice::train_step: the step graph needs a stream (the legacy default stream cannot "
                     "be captured)");
  if (batch < 1 || length < 1 || !tokens)  // forward's checks, before a capture begins
    throw ValueError(str_cat("SeqBoatLmDevice::train_step: batch ", batch, ", length ", length, " and tokens ",
                             tokens ? "set" : "null", " (need >= 1, >= 1, set)"));
  std::vector<long long> shape{batch, length, padding != nullptr, m.training};
  for (int i = 0; i < n_layers(); ++i)
    detail::append_layer_shape(shape, m.layers[static_cast<std::size_t>(i)], "SeqBoatLmDevice::train_step", i);
  std::vector<long long> key = shape;
  key.insert(key.end(), {detail::key_of(tokens), detail::key_of(padding), detail::key_of(targets)});
  // The scalars of this step go to device memory outside the graph; the update inside reads them.
  m.opt->prepare_step(lr, stream);
  m.graph.run(static_cast<cudaStream_t>(stream), shape, key, [&] {
    forward(batch, length, tokens, padding, nullptr, stream);
    loss(targets, -100, stream);
    backward(m.dlogits.data(), stream);
    m.opt->step_prepared(stream, /*zero_grads=*/true);
  });
  m.has_forward = true;
  m.grads_zero = true;
}

void SeqBoatLmDevice::set_step_graph(bool on) { impl_->graph.set_enabled(on); }
bool SeqBoatLmDevice::step_graph() const { return impl_->graph.enabled(); }
StepGraphStats SeqBoatLmDevice::step_graph_stats() const { return impl_->graph.stats(); }

std::vector<std::string> SeqBoatLmDevice::param_names() const { return impl_->params.names(); }

const float* SeqBoatLmDevice::param_data(const std::string& name) const { return impl_->params.at(name).value; }

std::vector<float> SeqBoatLmDevice::param(const std::string& name, void* stream) const {
  return impl_->params.value(name, static_cast<cudaStream_t>(stream));
}

std::vector<float> SeqBoatLmDevice::grad(const std::string& name, void* stream) const {
  return impl_->params.grad(name, static_cast<cudaStream_t>(stream));
}

}  // namespace sma::cuda
