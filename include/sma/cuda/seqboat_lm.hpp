// sma/cuda/seqboat_lm.hpp: the causal SeqBoat LM (sma::SeqBoatLm) on the device: from_cpu, add_grads_to and
// copy_params_to, which need the CPU model (the class and its contract: sma/cuda/seqboat_lm_device.hpp). Host
// header; no CUDA header is included.
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/param_transfer.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_lm_device.hpp>
#include <sma/models/lm.hpp>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda {

inline SeqBoatLmDevice SeqBoatLmDevice::from_cpu(SeqBoatLm<float>& cpu, bool dropout_as_eval) {
  const SeqBoatLmConfig& c = cpu.config();
  SeqBoatLmDeviceConfig d;
  d.dropout = dropout_as_eval ? 0.f : static_cast<float>(c.dropout);
  d.activation_dropout = dropout_as_eval ? 0.f : static_cast<float>(c.activation_dropout);
  d.vocab_size = static_cast<int>(c.vocab_size);
  d.d_model = static_cast<int>(c.embed_dim);
  d.ffn_hidden = cpu.has_ffn() ? static_cast<int>(c.ffn_hidden_dim) : 0;
  switch (c.activation) {
    case sma::Activation::silu: d.activation = DeviceActivation::silu; break;
    case sma::Activation::gelu: d.activation = DeviceActivation::gelu; break;
    case sma::Activation::relu: d.activation = DeviceActivation::relu; break;
    case sma::Activation::relu2: d.activation = DeviceActivation::relu2; break;
    case sma::Activation::identity: d.activation = DeviceActivation::identity; break;
  }
  d.prenorm = c.prenorm;
  switch (c.norm_type) {
    case NormType::layernorm: d.norm = NormKind::layernorm; break;
    case NormType::rmsnorm: d.norm = NormKind::rmsnorm; break;
    case NormType::scalenorm: d.norm = NormKind::scalenorm; break;
    case NormType::batchnorm:
      throw ValueError("SeqBoatLmDevice::from_cpu: norm_type batchnorm is not supported on the device (layernorm, "
                       "rmsnorm or scalenorm)");
  }
  d.norm_eps = 1e-5f;  // SeqBoatLm's norms (SequenceNorm's eps)
  d.embed_scale = cpu.embed_scale();
  std::vector<SeqBoatLayerDevice> layers;
  for (Index i = 0; i < cpu.num_layers(); ++i)
    layers.push_back(SeqBoatLayerDevice::from_cpu(cpu.layer(i), dropout_as_eval));
  std::vector<std::pair<std::string, std::vector<float>>> params;
  std::vector<DeviceParamInfo> info;
  detail::collect_host_params(
      cpu, [](const std::string& name) { return name.find(".slag_layer.") != std::string::npos; }, params, info);
  return SeqBoatLmDevice(d, std::move(layers), params, info);
}

inline void SeqBoatLmDevice::add_grads_to(SeqBoatLm<float>& cpu, void* stream) const {
  detail::write_host_params(cpu, detail::HostTarget::add_to_grads, "SeqBoatLmDevice::add_grads_to",
                            [&](const std::string& name) { return grad(name, stream); });
}

inline void SeqBoatLmDevice::copy_params_to(SeqBoatLm<float>& cpu, void* stream) const {
  detail::write_host_params(cpu, detail::HostTarget::values, "SeqBoatLmDevice::copy_params_to",
                            [&](const std::string& name) { return param(name, stream); });
}

}  // namespace sma::cuda
