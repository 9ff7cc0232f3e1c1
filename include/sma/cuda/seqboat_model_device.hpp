// sma/cuda/seqboat_model_device.hpp: the declaration of SeqBoatModelDevice (the SeqBoat classifier, training
// included, on the device) without the CPU model headers: see sma/cuda/seqboat_model.hpp for from_cpu and
// add_grads_to, which need sma::SeqBoatModel. Definitions in cuda/model/.
#pragma once

#include <sma/cuda/adamw.hpp>
#include <sma/cuda/optimizer.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/loss.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/step_graph.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sma {
template <class T>
class SeqBoatModel;
}  // namespace sma

namespace sma::cuda {

struct SeqBoatModelDeviceConfig {
  int d_input = 1, d_output = 10, d_model = 0;
  bool prenorm = false;                       ///< then a final norm of kind `final_norm` before the pooling
  NormKind final_norm = NormKind::layernorm;
  float norm_eps = 1e-5f, norm_momentum = 0.1f;
};

/// Where a parameter sits in the CPU model's visiting order, and how the optimiser treats it.
struct DeviceParamInfo {
  std::string name;
  bool trainable = true;  ///< false for buffers (batchnorm running statistics)
  bool decay = true;      ///< weight decay (matrices, rank >= 2, as sma::train::Optimizer decides by default)
};

class SeqBoatModelDevice {
 public:
  /// `params`: the encoder.*, final_norm.* and decoder.* values by official name; `info`: every parameter of the
  /// model (the layers' as "seq_layers.<i>.<name>") in the CPU visiting order.
  SeqBoatModelDevice(const SeqBoatModelDeviceConfig& cfg, std::vector<SeqBoatLayerDevice> layers,
                     const std::vector<std::pair<std::string, std::vector<float>>>& params,
                     const std::vector<DeviceParamInfo>& info);
  ~SeqBoatModelDevice();
  SeqBoatModelDevice(SeqBoatModelDevice&&) noexcept;
  SeqBoatModelDevice& operator=(SeqBoatModelDevice&&) noexcept;

  /// The device copy of a CPU model (configuration and current values; see SeqBoatLayerDevice::from_cpu for what
  /// throws). Starts in train mode.
  static SeqBoatModelDevice from_cpu(SeqBoatModel<float>& cpu, bool dropout_as_eval = false);

  const SeqBoatModelDeviceConfig& config() const;
  int n_layers() const;
  SeqBoatLayerDevice& layer(int i);
  /// Train mode (batchnorm batch statistics, running statistics updated; the layers' dropout) or eval mode, for
  /// every layer and norm.
  void set_training(bool on);
  bool training() const;
  /// Seeds every layer's dropout (each layer its own seed derived from `seed`; SeqBoatLayerDevice::
  /// set_dropout_seed) and restarts their draw counters. The constructor seeds with 0.
  void set_dropout_seed(std::uint64_t seed, void* stream = nullptr);
  /// bf16 projections in every layer (SeqBoatDeviceConfig::bf16_projections).
  void set_bf16_projections(bool on);
  /// bf16 attention in every layer (SeqBoatLayerDevice::set_bf16_attention).
  void set_bf16_attention(bool on);

  /// logits (B, d_output) = model(x), x (B, L, d_input), padding (B, L) uint8 (1 = pad) or nullptr; the logits
  /// are also kept (logits()). Mean pooling over each row's real tokens; a row that is all padding pools to 0
  /// (the CPU model throws; checking would need a wait for the host).
  void forward(int batch, int length, const float* x, const std::uint8_t* padding, float* logits = nullptr,
               void* stream = nullptr);
  /// From dlogits (B, d_output) of the last forward: parameter gradients ADDED; dx (B, L, d_input) written when
  /// not null.
  void backward(const float* dlogits, float* dx = nullptr, void* stream = nullptr);
  /// The last forward's logits (B, d_output), device memory.
  const float* logits() const;

  /// Softmax cross-entropy of the last forward's logits against labels (B, int32, device; `ignore` rows left out),
  /// mean over the counted rows as sma::optim::cross_entropy; its gradient goes to an internal dlogits that
  /// backward_loss() uses. Nothing waits for the host.
  void loss(const int* labels, int ignore = -100, void* stream = nullptr);
  void backward_loss(float* dx = nullptr, void* stream = nullptr);
  /// The last loss, read back (waits for `stream`); throws ValueError for a label outside [0, d_output).
  CrossEntropyValue read_loss(void* stream = nullptr) const;

  void zero_grad(void* stream = nullptr);
  /// AdamW over the trainable parameters (decay as DeviceParamInfo says); replaces the optimiser and its state.
  void set_optimizer(const AdamWConfig& cfg);
  /// AdamW, RAdam or SGD (cfg.kind) likewise.
  void set_optimizer(const DeviceOptimizerConfig& cfg);
  DeviceOptimizer& optimizer();
  void step(double lr, void* stream = nullptr);
  /// One training step: forward, loss, backward, the optimiser's update with learning rate `lr`, all queued on `stream` with no
  /// wait for the host (read_loss() reads the loss when wanted). The gradients are cleared by the update kernel
  /// after use, so grad() reads 0 after a train_step; call forward/loss/backward_loss to inspect gradients.
  void train_step(int batch, int length, const float* x, const std::uint8_t* padding, const int* labels, double lr,
                  void* stream = nullptr);

  /// Opt-in: train_step recorded once per shape as a CUDA graph and replayed (sma/cuda/step_graph.hpp says when it
  /// captures, replays or runs plainly). The results are bitwise those of the plain train_step. Needs a stream
  /// other than the legacy default one (ValueError otherwise) and no layer with host_compressed_length. While a
  /// step is captured, cuda::bounded_gemm runs its products whole. Buffers of the model are reallocated only by
  /// the model's own calls (a forward at another shape, set_optimizer, ...), which the graph follows; do not call
  /// a layer's forward directly at another shape between graph steps.
  void set_step_graph(bool on);
  bool step_graph() const;
  StepGraphStats step_graph_stats() const;

  /// Every parameter by official name, in the CPU visiting order (buffers included).
  std::vector<std::string> param_names() const;
  /// Host copies, taken after the work queued on `stream`.
  std::vector<float> param(const std::string& name, void* stream = nullptr) const;
  std::vector<float> grad(const std::string& name, void* stream = nullptr) const;
  /// Adds the device gradients into the CPU model's Param::grad (same names).
  void add_grads_to(SeqBoatModel<float>& cpu, void* stream = nullptr) const;
  /// Copies the device values (parameters and buffers) into the CPU model.
  void copy_params_to(SeqBoatModel<float>& cpu, void* stream = nullptr) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
