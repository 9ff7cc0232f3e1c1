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
  if (p.drop_threshold > 0)
    attn::local_attention_forward_kernel<attn::DefaultTraits, true><<<grid, attn::DefaultTraits::kThreads, 0, s>>>(p);
  else
    attn::local_attention_forward_kernel<attn::DefaultTraits><<<grid, attn::DefaultTraits::kThreads, 0, s>>>(p);
  SMA_CUDA_CHECK_LAUNCH();
}

PaddedLayout local_attention_padded_layout(const LocalAttentionConfig& cfg, int capacity) {
  if (cfg.window < 1)
    throw ValueError(str_cat("cuda::local_attention_padded_layout: window must be >= 1, got ", cfg.window));
  if (capacity < 0)
    throw ValueError(str_cat("cuda::local_attention_padded_layout: capacity must be >= 0, got ", capacity));
  PaddedLayout l;
  if (capacity == 0) return l;
  const attn::BandGeometry g(cfg, capacity);
  l.rows = g.rows;
  l.offset = g.wpad;
  return l;
}

void local_attention_pad_bf16(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in, PaddedOperand which,
                              const float* src, void* dst, void* stream) {
  const char* where = "cuda::local_attention_pad_bf16";
  const int w = static_cast<int>(which);
  if (w < 0 || w > 3) throw ValueError(str_cat(where, ": unknown operand ", w));
  const bool qk = which == PaddedOperand::q || which == PaddedOperand::k;
  const bool rot = qk && cfg.position == Position::rotary;
  const int width = qk ? in.z : in.h;
  if (cfg.window < 1) throw ValueError(str_cat(where, ": window must be >= 1, got ", cfg.window));
  if (in.batch < 0 || in.capacity < 0)
    throw ValueError(str_cat(where, ": batch and capacity must be >= 0, got ", in.batch, " and ", in.capacity));
  if (width < 1) throw ValueError(str_cat(where, ": width must be >= 1, got ", width));
  if (in.capacity == 0) return;
  if (!in.offsets || !src || !dst) throw ValueError(str_cat(where, ": offsets, src or dst is nullptr"));
  if (!attn::aligned16(dst)) throw ValueError(str_cat(where, ": dst must be 16-byte aligned (as cudaMalloc's)"));
  if (rot && !in.positions) throw ValueError(str_cat(where, ": rotary positions need in.positions"));
  if (rot && (width % 2 != 0 || width > attn::kMaxRotaryZ))
    throw ValueError(str_cat(where, ": rotary positions need an even Z <= ", attn::kMaxRotaryZ, ", got ", width));
  if (rot && !(cfg.rotary_theta > 0))
    throw ValueError(str_cat(where, ": rotary_theta must be > 0, got ", cfg.rotary_theta));
  const attn::BandGeometry g(cfg, in.capacity);
  attn::launch_pad_bf16(src, static_cast<__nv_bfloat16*>(dst), width, g, in, cfg, rot, attn::band_chunk_blocks(g),
                        static_cast<cudaStream_t>(stream));
}

}  // namespace sma::cuda
