// sma/cuda/seqboat_layer.hpp: a whole SeqBoat layer (sma::SeqBoatLayer) forward and backward on the device, fp32
// (definitions in cuda/seqboat/). Host class; no CUDA header is included.
//
// WHAT     The CPU layer's dataflow (models/seqboat.hpp) with device kernels: norm (pre or post) -> EMA (chunked
//          scan) -> SiLU -> hx_proj (cuBLAS) -> router (fp32 logits) -> plan_compression (S stays on the device)
//          -> compress -> mx_proj (cuBLAS) -> q, k, r, v -> fused local attention -> h_proj (cuBLAS) -> gated
//          extract_add onto hx -> + residual -> SiLU. Backward runs the chain in reverse and ADDS every
//          parameter's gradient into device buffers, which grad()/download_grads() copy to the host.
// SHAPES   x, out, dy, dx (B, L, D) device pointers; padding (B, L) uint8 (1 = pad) or nullptr.
// PARAMS   the CPU layer's, by official name ("ssm.delta", "hx_proj.weight", "mx_proj.bias", "gamma", ...),
//          uploaded from a SeqBoatLayer<float> by from_cpu().
// LIMITS   fp32, with bf16 projections and a bf16 attention as switches (set_bf16_projections,
//          set_bf16_attention); dropout (SeqBoatLayerConfig::dropout) with device-drawn masks
//          (sma/cuda/dropout.hpp), the GAU's hidden_dropout and its attention_dropout (the CPU attention op's
//          pair mask, seeded per draw; from_cpu(layer, true) runs every rate as 0); Z <= 128 (the fp32 attention kernels' limit, checked at construction even
//          when the attention will run in bf16, which alone would take any Z). The
//          projections after compression run on the B*L upper bound of the compressed rows (cuBLAS takes host
//          shapes; S is never read back unless set_host_compressed_length), on zero rows past S.
// ERRORS   ValueError (configuration, shapes, backward without forward), CudaError (failed CUDA/cuBLAS call).
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/param_transfer.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/models/seqboat.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace sma::cuda {

// ---- implementation of the header-only parts ----

inline SeqBoatLayerDevice SeqBoatLayerDevice::from_cpu(SeqBoatLayer<float>& cpu, bool dropout_as_eval) {
  const SeqBoatLayerConfig& c = cpu.config();
  SeqBoatDeviceConfig d;
  d.dropout = dropout_as_eval ? 0.f : static_cast<float>(c.dropout);
  d.hidden_dropout = dropout_as_eval ? 0.f : static_cast<float>(c.hidden_dropout);
  d.attention.dropout = dropout_as_eval ? 0.0 : c.attention_dropout;
  d.embed_dim = static_cast<int>(c.embed_dim);
  d.zdim = static_cast<int>(c.zdim);
  d.hdim = static_cast<int>(c.hdim);
  d.ndim = static_cast<int>(c.ndim);
  d.bidirectional = c.direction == Direction::bidirectional;
  d.truncation = static_cast<int>(c.truncation);
  d.attention.window = static_cast<int>(c.window_size);
  d.attention.causal = !d.bidirectional;
  switch (c.attention_activation) {
    case ops::AttentionActivation::relu2: d.attention.activation = Activation::relu2; break;
    case ops::AttentionActivation::softmax: d.attention.activation = Activation::softmax; break;
    case ops::AttentionActivation::laplace: d.attention.activation = Activation::laplace; break;
  }
  switch (c.rel_pos) {
    case ops::PositionEncoding::none: d.attention.position = Position::none; break;
    case ops::PositionEncoding::simple: d.attention.position = Position::simple; break;
    case ops::PositionEncoding::local_simple: d.attention.position = Position::local_simple; break;
    case ops::PositionEncoding::rotary: d.attention.position = Position::rotary; break;
  }
  d.attention.max_positions = static_cast<int>(c.max_positions);
  d.attention.rotary_theta = cpu.gau().config().attention.rotary_theta;
  switch (c.norm_type) {
    case NormType::layernorm: d.norm = NormKind::layernorm; break;
    case NormType::rmsnorm: d.norm = NormKind::rmsnorm; break;
    case NormType::scalenorm: d.norm = NormKind::scalenorm; break;
    case NormType::batchnorm:
      d.norm = NormKind::batchnorm;
      d.norm_momentum = static_cast<float>(std::get<BatchNorm<float>>(cpu.norm().variant()).config().momentum);
      break;
  }
  d.prenorm = c.prenorm;
  d.norm_eps = 1e-5f;  // SequenceNorm's eps, as the CPU layer builds it
  d.routing = c.routing == RoutingSemantics::per_row ? CompressionSemantics::per_row : CompressionSemantics::reference;
  d.router_shift = static_cast<float>(c.router_shift);
  std::vector<std::pair<std::string, std::vector<float>>> params;
  cpu.visit_params([&](const auto& name, Param<float>& p) {
    params.emplace_back(std::string(name), std::vector<float>(p.data(), p.data() + p.size()));
  });
  return SeqBoatLayerDevice(d, params);
}

inline void SeqBoatLayerDevice::add_grads_to(SeqBoatLayer<float>& cpu, void* stream) const {
  detail::write_host_params(cpu, detail::HostTarget::add_to_grads, "SeqBoatLayerDevice::add_grads_to",
                            [&](const std::string& name) { return grad(name, stream); });
}

}  // namespace sma::cuda
