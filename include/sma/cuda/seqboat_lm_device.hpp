// sma/cuda/seqboat_lm_device.hpp: the declaration of SeqBoatLmDevice (the causal SeqBoat LM, training included, on
// the device) without the CPU model headers: see sma/cuda/seqboat_lm.hpp for from_cpu, add_grads_to and
// copy_params_to, which need sma::SeqBoatLm. Definitions in cuda/model/seqboat_lm.cu.
//
// WHAT     token embedding times embed_scale (padded tokens 0) -> n x (SeqBoatLayerDevice, then a normalised
//          feed-forward block when ffn_hidden > 0) -> final norm (prenorm only) -> padded rows 0 -> logits
//          = top E^T (the output projection tied to the embedding E) -> token-level softmax cross-entropy
//          (sma::cuda::cross_entropy over the B*L rows, `ignore` targets left out) -> backward -> AdamW.
// SHAPES   tokens, targets (B, L) int32, padding (B, L) uint8 (1 = pad) or nullptr, logits / dlogits (B, L, V) fp32;
//          all device pointers.
// FFN      (sma::Ffn) prenorm: y = x + fc2(act(fc1(norm(x)))); post-norm: y = norm(x + fc2(act(fc1(x)))).
// EMBEDDING BACKWARD  E's gradient gets the head's part dlogits^T top (one product) and the input part
//          embed_scale * sum of dh over each token's positions: the positions are grouped by token with a stable
//          radix sort of the token ids, and every vocabulary row sums its positions in position order (16 strided
//          partial sums added in a fixed order): no float atomics, the same bits on every run.
// TOKENS   a token outside [0, V) cannot throw without a wait for the host: the forward records the first one
//          (its flat index and value), embeds it as zeros and leaves it out of the embedding's gradient;
//          read_loss() and check_tokens() throw ValueError naming it.
// LIMITS   the layer's (fp32 or bf16 projections / attention, Z <= 128; dropout, hidden_dropout and the blocks'
//          dropout and activation_dropout with device-drawn masks, attention_dropout included; from_cpu with
//          dropout_as_eval runs them all as 0); layernorm, rmsnorm or scalenorm (batchnorm throws in from_cpu).
// ERRORS   ValueError (configuration, sizes, null pointers, backward without forward, train_step without optimiser,
//          bad tokens or targets when read), ShapeError (parameter sizes), KeyError (unknown parameter name),
//          CudaError (failed CUDA/cuBLAS call).
#pragma once

#include <sma/cuda/adamw.hpp>
#include <sma/cuda/optimizer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/loss.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/seqboat_model_device.hpp>
#include <sma/cuda/step_graph.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sma {
template <class T>
class SeqBoatLm;
}  // namespace sma

namespace sma::cuda {

/// The feed-forward blocks' activation (sma::Activation's members; gelu is the exact erf form).
enum class DeviceActivation : int { silu, gelu, relu, relu2, identity };

struct SeqBoatLmDeviceConfig {
  int vocab_size = 0, d_model = 0;
  int ffn_hidden = 0;                      ///< 0 = no feed-forward blocks
  DeviceActivation activation = DeviceActivation::silu;
  bool prenorm = true;                     ///< pre-norm blocks and a final norm; else post-norm blocks, no final norm
  NormKind norm = NormKind::layernorm;     ///< the feed-forward blocks' and the final norm's kind
  float norm_eps = 1e-5f;
  float embed_scale = 1.f;                 ///< sqrt(D) when the CPU model scales its embeddings
  /// The feed-forward blocks' dropout in training (SeqBoatLmConfig::dropout on fc2's output, activation_dropout
  /// after the activation), with device-drawn masks as the layers' (sma/cuda/dropout.hpp); the layers take
  /// their own rate from their configuration.
  float dropout = 0.f, activation_dropout = 0.f;
};

class SeqBoatLmDevice {
 public:
  /// `params`: every parameter outside the layers (decoder.embed_tokens.weight, decoder.layers.<i>.nffn.*,
  /// decoder.final_norm.*) by official name; `info`: every parameter (the layers' as
  /// "decoder.layers.<i>.slag_layer.<name>") in the CPU visiting order.
  SeqBoatLmDevice(const SeqBoatLmDeviceConfig& cfg, std::vector<SeqBoatLayerDevice> layers,
                  const std::vector<std::pair<std::string, std::vector<float>>>& params,
                  const std::vector<DeviceParamInfo>& info);
  ~SeqBoatLmDevice();
  SeqBoatLmDevice(SeqBoatLmDevice&&) noexcept;
  SeqBoatLmDevice& operator=(SeqBoatLmDevice&&) noexcept;

  /// The device copy of a CPU LM (configuration and current values). See LIMITS for what throws.
  static SeqBoatLmDevice from_cpu(SeqBoatLm<float>& cpu, bool dropout_as_eval = false);

  const SeqBoatLmDeviceConfig& config() const;
  int n_layers() const;
  SeqBoatLayerDevice& layer(int i);
  const SeqBoatLayerDevice& layer(int i) const;
  void set_training(bool on);
  bool training() const;
  /// Seeds the dropout of every layer and feed-forward block (each its own seed derived from `seed`) and restarts
  /// their draw counters (SeqBoatLayerDevice::set_dropout_seed). The constructor seeds with 0.
  void set_dropout_seed(std::uint64_t seed, void* stream = nullptr);
  /// bf16 projections / attention in every layer (SeqBoatLayerDevice's switches).
  void set_bf16_projections(bool on);
  void set_bf16_attention(bool on);

  /// logits (B, L, V) of tokens (B, L); also kept (logits()). `logits` may be nullptr.
  void forward(int batch, int length, const int* tokens, const std::uint8_t* padding, float* logits = nullptr,
               void* stream = nullptr);
  /// From dlogits (B, L, V) of the last forward: every parameter gradient ADDED.
  void backward(const float* dlogits, void* stream = nullptr);
  /// The last forward's logits (B, L, V), device memory.
  const float* logits() const;

  /// Mean cross-entropy of the last forward's logits against targets (B*L int32, device; `ignore` left out); its
  /// gradient goes to an internal dlogits that backward_loss() uses. Nothing waits for the host.
  void loss(const int* targets, int ignore = -100, void* stream = nullptr);
  void backward_loss(void* stream = nullptr);
  /// The last loss, read back (waits for `stream`). Throws ValueError for a token of the last forward or a target
  /// outside [0, V).
  CrossEntropyValue read_loss(void* stream = nullptr) const;
  /// Throws ValueError naming the first token of the last forward outside [0, V) (waits for `stream`).
  void check_tokens(void* stream = nullptr) const;

  void zero_grad(void* stream = nullptr);
  /// AdamW over the trainable parameters (decay on matrices); replaces the optimiser and its state.
  void set_optimizer(const AdamWConfig& cfg);
  /// AdamW, RAdam or SGD (cfg.kind) likewise.
  void set_optimizer(const DeviceOptimizerConfig& cfg);
  DeviceOptimizer& optimizer();
  void step(double lr, void* stream = nullptr);
  /// forward, loss (ignore -100), backward and the optimiser's update with learning rate `lr`, queued on `stream` with no wait for
  /// the host. The update clears the gradients after use (grad() reads 0 after a train_step).
  void train_step(int batch, int length, const int* tokens, const std::uint8_t* padding, const int* targets,
                  double lr, void* stream = nullptr);
  /// Opt-in: train_step as a CUDA graph, replayed (as SeqBoatModelDevice::set_step_graph; sma/cuda/step_graph.hpp).
  void set_step_graph(bool on);
  bool step_graph() const;
  StepGraphStats step_graph_stats() const;

  /// Every parameter by official name, in the CPU visiting order.
  std::vector<std::string> param_names() const;
  /// The device storage of a parameter's value (what forward reads; KeyError for an unknown name), valid while the
  /// model lives: for code that reads the weights in place, such as SeqBoatLmStreamerDevice.
  const float* param_data(const std::string& name) const;
  /// Host copies, taken after the work queued on `stream`.
  std::vector<float> param(const std::string& name, void* stream = nullptr) const;
  std::vector<float> grad(const std::string& name, void* stream = nullptr) const;
  /// Adds the device gradients into the CPU LM's Param::grad (same names).
  void add_grads_to(SeqBoatLm<float>& cpu, void* stream = nullptr) const;
  /// Copies the device values into the CPU LM.
  void copy_params_to(SeqBoatLm<float>& cpu, void* stream = nullptr) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
