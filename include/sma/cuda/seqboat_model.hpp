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
// LIMITS   the layer's (fp32 or bf16 projections; no dropout: from_cpu throws for rates > 0 unless dropout_as_eval;
//          Z <= 128). Batchnorm counts padded tokens in its statistics, as the CPU layer and the reference do.
// ERRORS   ValueError (configuration, sizes, backward without forward, train_step without optimiser, bad labels
//          when the loss is read), ShapeError (parameter sizes), CudaError (failed CUDA/cuBLAS call).
#pragma once

#include <sma/core/error.hpp>
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
  cpu.visit_params([&](const auto& name_, Param<float>& p) {
    const std::string name(name_);
    info.push_back({name, p.trainable(), p.rank() >= 2});
    if (name.rfind("seq_layers.", 0) != 0)
      params.emplace_back(name, std::vector<float>(p.data(), p.data() + p.size()));
  });
  return SeqBoatModelDevice(d, std::move(layers), params, info);
}

inline void SeqBoatModelDevice::add_grads_to(SeqBoatModel<float>& cpu, void* stream) const {
  cpu.visit_params([&](const auto& name_, Param<float>& p) {
    const std::string name(name_);
    const std::vector<float> g = grad(name, stream);
    if (static_cast<Index>(g.size()) != p.size())
      throw ShapeError(str_cat("SeqBoatModelDevice::add_grads_to: ", name, " has ", g.size(), " device entries for ",
                               p.size(), " host ones"));
    for (Index i = 0; i < p.size(); ++i) p.grad()[i] += g[static_cast<std::size_t>(i)];
  });
}

inline void SeqBoatModelDevice::copy_params_to(SeqBoatModel<float>& cpu, void* stream) const {
  cpu.visit_params([&](const auto& name_, Param<float>& p) {
    const std::string name(name_);
    const std::vector<float> v = param(name, stream);
    if (static_cast<Index>(v.size()) != p.size())
      throw ShapeError(str_cat("SeqBoatModelDevice::copy_params_to: ", name, " has ", v.size(),
                               " device entries for ", p.size(), " host ones"));
    for (Index i = 0; i < p.size(); ++i) p.data()[i] = v[static_cast<std::size_t>(i)];
  });
}

}  // namespace sma::cuda
