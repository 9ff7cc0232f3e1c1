// sma/cuda/seqboat_device.hpp: the declaration of SeqBoatLayerDevice (a SeqBoat layer on the device), without the
// CPU model headers: see sma/cuda/seqboat_layer.hpp for the contract and for from_cpu / add_grads_to, which need
// sma::SeqBoatLayer. Definitions in cuda/seqboat/.
#pragma once

#include <sma/cuda/compress.hpp>
#include <sma/cuda/dropout.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/local_attention.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sma {
template <class T>
class SeqBoatLayer;
}  // namespace sma

namespace sma::cuda {

struct SeqBoatDeviceConfig {
  int embed_dim = 0, zdim = 0, hdim = 0, ndim = 2;  ///< D, Z, H, N
  bool bidirectional = false;
  int truncation = 0;
  LocalAttentionConfig attention{};
  NormKind norm = NormKind::layernorm;
  bool prenorm = true;
  float norm_eps = 1e-5f;
  float norm_momentum = 0.1f;  ///< batchnorm's running-statistics momentum
  /// Train mode (batchnorm: batch statistics, running statistics updated; dropout) or eval mode (running
  /// statistics, no dropout).
  bool training = true;
  /// SeqBoatLayerConfig::dropout, in [0, 1): in train mode, on silu(EMA output), and on the GAU's output
  /// (bidirectional) or on hx + gate * h (causal), as the CPU layer places it. The masks are a function of
  /// (dropout_seed, the layer's draw counter, site, element) (sma/cuda/dropout.hpp), not the CPU layer's
  /// std::mt19937_64 draws; every training forward advances the counter on the device (so a step graph's replays
  /// draw fresh masks) and its backward re-derives the same masks. The GAU's attention_dropout is
  /// attention.dropout (LocalAttentionConfig::dropout), seeded from dropout_seed and the same draw counter.
  float dropout = 0.f;
  /// SeqBoatLayerConfig::hidden_dropout, in [0, 1): the GAU's v in train mode, with masks drawn as dropout's.
  float hidden_dropout = 0.f;
  std::uint64_t dropout_seed = 0;
  CompressionSemantics routing = CompressionSemantics::reference;
  float router_shift = 0.f;
  /// The three projections (hx_proj, mx_proj, h_proj; forward and backward products) with bf16 operands on the
  /// tensor cores, fp32 accumulation and fp32 results (cublasGemmEx); weights, gradients and every other op stay
  /// fp32, and the two router logits are recomputed in fp32 so that routing decisions are taken on fp32 values.
  bool bf16_projections = false;
  /// Reads S = offsets[B] back to the host once per forward (one stream synchronisation) and runs the products
  /// after compression on S rows instead of the B*L bound, so that their cost falls with the density. Off by
  /// default: then nothing in forward or backward waits for the host.
  bool host_compressed_length = false;
  /// With bf16_projections and attention.bf16: the GAU's activation pass writes the attention's padded bf16 q, k, v
  /// and the backward's dout pass its padded bf16 dout (LocalAttentionInputs::*_padded, kept by the layer), so the
  /// attention makes no padded copies of its own. Same bits either way; false: the attention pads the fp32 tensors
  /// itself (kept for comparison and timing). The layer's constructor takes SMA_CUDA_PADDED_ATTENTION=0/1 from the
  /// environment over this value when it is set.
  bool padded_attention_operands = true;
};

/// A parameter's device storage (value and gradient, `size` floats each), for optimisers over the layer.
struct DeviceParamRef {
  std::string name;
  float* value = nullptr;
  float* grad = nullptr;
  long long size = 0;
};

class SeqBoatLayerDevice {
 public:
  /// `params`: every parameter by official name with its values (sizes checked against the configuration).
  SeqBoatLayerDevice(const SeqBoatDeviceConfig& cfg, const std::vector<std::pair<std::string, std::vector<float>>>& params);
  ~SeqBoatLayerDevice();
  SeqBoatLayerDevice(SeqBoatLayerDevice&&) noexcept;
  SeqBoatLayerDevice& operator=(SeqBoatLayerDevice&&) noexcept;

  /// The device copy of a CPU layer (its configuration, its three dropout rates included, and current parameter
  /// values). Throws ValueError for what the device layer does not support. `dropout_as_eval`: every dropout rate
  /// is taken as 0, as the CPU layer in eval mode. The layer starts in train mode.
  static SeqBoatLayerDevice from_cpu(SeqBoatLayer<float>& cpu, bool dropout_as_eval = false);

  const SeqBoatDeviceConfig& config() const;
  /// The router shift (SeqBoatLayerConfig::router_shift), e.g. to steer the density in benchmarks.
  void set_router_shift(float shift);
  /// SeqBoatDeviceConfig::bf16_projections, switchable between calls (a backward uses the forward's setting).
  void set_bf16_projections(bool on);
  /// SeqBoatDeviceConfig::host_compressed_length, switchable between calls.
  void set_host_compressed_length(bool on);
  /// LocalAttentionConfig::bf16 of the attention (tensor-core bf16 band products), switchable between calls.
  void set_bf16_attention(bool on);
  /// SeqBoatDeviceConfig::padded_attention_operands, switchable between calls.
  void set_padded_attention_operands(bool on);
  /// SeqBoatDeviceConfig::training, switchable between calls (a backward uses the forward's statistics).
  void set_training(bool on);
  bool training() const;
  /// Sets SeqBoatDeviceConfig::dropout_seed and restarts the draw counter (queued on `stream`), so that the next
  /// training forwards draw the same masks as after any other call with this seed.
  void set_dropout_seed(std::uint64_t seed, void* stream = nullptr);
  /// The draw counter (the last training forward with dropout used this draw; 0: none since set_dropout_seed),
  /// read after the work queued on `stream`.
  std::uint64_t dropout_draw(void* stream = nullptr) const;

  /// out (B, L, D) = layer(x); keeps what backward needs (x and padding are copied).
  void forward(int batch, int length, const float* x, const std::uint8_t* padding, float* out, void* stream = nullptr);
  /// dx (B, L, D) from dy (B, L, D) for the last forward; parameter gradients are ADDED.
  void backward(const float* dy, float* dx, void* stream = nullptr);

  void zero_grad(void* stream = nullptr);
  std::vector<std::string> param_names() const;
  /// Every parameter's device storage, in param_names() order (the batchnorm buffers running_mean, running_var and
  /// num_batches_tracked included: they have gradients that stay 0).
  std::vector<DeviceParamRef> param_refs();
  /// Host copies, taken after the work queued on `stream` (pass the stream the layer ran on).
  std::vector<float> param(const std::string& name, void* stream = nullptr) const;
  std::vector<float> grad(const std::string& name, void* stream = nullptr) const;
  /// Adds the device gradients into the CPU layer's Param::grad (same names).
  void add_grads_to(SeqBoatLayer<float>& cpu, void* stream = nullptr) const;

  /// The last forward's activation mask (B*L), copied after the work queued on `stream` (the forward's stream;
  /// a non-blocking stream is not ordered with the legacy one), and its compression plan (device memory; its
  /// host accessors take the stream too).
  std::vector<std::uint8_t> active(void* stream = nullptr) const;
  const DeviceCompression& plan() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
