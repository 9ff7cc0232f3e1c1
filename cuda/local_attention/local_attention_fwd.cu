// sma::cuda::local_attention_forward: the launcher of the fused fp32 forward kernel (one instantiation:
// DefaultTraits), or of the bf16 band path (band_bf16.cuh) when cfg.bf16.
#include <sma/cuda/local_attention.hpp>

#include "band_bf16.cuh"
#include "forward_kernel.cuh"
#include "launch.cuh"

namespace sma::cuda {

void local_attention_forward(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, const float* bias_table,
                             float* out, float* row_stat, void* stream) {
  const char* where = "cuda::local_attention_forward";
  attn::validate(cfg, in, bias_table, where);
  if (in.capacity == 0) return;
  if (!out) throw ValueError(str_cat(where, ": out is nullptr"));
  const auto s = static_cast<cudaStream_t>(stream);
  attn::LocalAttentionParams p = attn::make_params(cfg, in, bias_table);
  if (cfg.bf16) {
    p.out = out;
    p.row_stat = cfg.activation == Activation::softmax ? row_stat : nullptr;
    attn::local_attention_forward_bf16(cfg, in, p, out, s);
    return;
  }
  attn::AsyncWorkspace ws(s);
  attn::rotate_qk(cfg, in, p, ws, s);
  p.out = out;
  p.row_stat = cfg.activation == Activation::softmax ? row_stat : nullptr;
  const dim3 grid(attn::row_blocks(in.capacity), attn::col_blocks(in.h));
  attn::local_attention_forward_kernel<attn::DefaultTraits><<<grid, attn::DefaultTraits::kThreads, 0, s>>>(p);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace sma::cuda
