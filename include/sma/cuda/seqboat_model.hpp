// sma/cuda/seqboat_model.hpp: the SeqBoat classifier (sma::SeqBoatModel) on the device, forward, backward, softmax
// cross-entropy and AdamW (definitions in cuda/model/). Host class; no CUDA header is included.
//
// WHAT     encoder Linear(d_input -> D) (cuBLAS) -> n SeqBoatLayerDevice -> final norm (prenorm only; any norm,
//          batchnorm included) -> mean pooling over the real tokens -> decoder Linear(D -> d_output); loss and its
//          gradient; AdamW over all trainable parameters in one fused kernel; train_step() chains them with no
//          wait for the host.
// SHAPES   x (B, L, d_input), padding (B, L) uint8 (1 = pad) or nullptr, logits / dlogits (B, d_output), labels
//          (B) int32; all device pointers.
// PARAMS   the CPU model's names ("encoder.weight", "seq_layers.0.hx_proj.weight", "final_norm.norm.weight",
//          "decoder.bias", ...), uploaded by from_cpu().
// LIMITS   the layer's (fp32 or bf16 projections; the layers' dropout, hidden_dropout and attention_dropout with
//          device-drawn masks, all 0 with from_cpu's dropout_as_eval; Z <= 128). Batchnorm counts
//          padded tokens in its statistics, as the CPU layer and the reference do.
// ERRORS   ValueError (configuration, sizes, backward without forward, train_step without optimiser, bad labels
//          when the loss is read), ShapeError (parameter sizes), CudaError (failed CUDA/cuBLAS call).
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/param_transfer.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_model_device.hpp>
#include <sma/models/seqboat.hpp>

#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace sma::cuda {

inline SeqBoatModelDevice SeqBoatModelDevice::from_cpu(SeqBoatModel<float>& cpu, bool dropout_as_eval) {
  const SeqBoatModelConfig& c = cpu.config();
  SeqBoatModelDeviceConfig d;
  d.d_input = static_cast<int>(c.d_input);
  d.d_output = static_cast<int>(c.d_output);
  d.d_model = static_cast<int>(c.d_model);
  d.prenorm = c.prenorm;
  switch (c.norm_type) {
    case NormType::layernorm: d.final_norm = NormKind::layernorm; break;
    case NormType::rmsnorm: d.final_norm = NormKind::rmsnorm; break;
    case NormType::scalenorm: d.final_norm = NormKind::scalenorm; break;
    case NormType::batchnorm: d.final_norm = NormKind::batchnorm; break;
  }
  if (c.prenorm && c.norm_type == NormType::batchnorm)
    d.norm_momentum =
        static_cast<float>(std::get<BatchNorm<float>>(cpu.final_norm().variant()).config().momentum);
  std::vector<SeqBoatLayerDevice> layers;
  for (Index i = 0; i < cpu.layers().size(); ++i)
    layers.push_back(SeqBoatLayerDevice::from_cpu(cpu.layers()[i], dropout_as_eval));
  std::vector<std::pair<std::string, std::vector<float>>> params;
  std::vector<DeviceParamInfo> info;
  detail::collect_host_params(
      cpu, [](const std::string& name) { return name.rfind("seq_layers.", 0) == 0; }, params, info);
  return SeqBoatModelDevice(d, std::move(layers), params, info);
}

inline void SeqBoatModelDevice::add_grads_to(SeqBoatModel<float>& cpu, void* stream) const {
  detail::write_host_params(cpu, detail::HostTarget::add_to_grads, "SeqBoatModelDevice::add_grads_to",
                            [&](const std::string& name) { return grad(name, stream); });
}

inline void SeqBoatModelDevice::copy_params_to(SeqBoatModel<float>& cpu, void* stream) const {
  detail::write_host_params(cpu, detail::HostTarget::values, "SeqBoatModelDevice::copy_params_to",
                            [&](const std::string& name) { return param(name, stream); });
}

}  // namespace sma::cuda
