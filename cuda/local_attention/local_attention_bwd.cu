// sma::cuda::local_attention_backward: the launchers of the three backward kernels (dq + bias gradient, dk, dv), the
// softmax row deltas, the bias-gradient reduction and the rotary transforms. One instantiation: DefaultTraits. With
// cfg.bf16: the band path of band_bf16_bwd.cuh (after the same softmax row deltas).
#include <sma/cuda/local_attention.hpp>

#include "backward_kernel.cuh"
#include "band_bf16_bwd.cuh"
#include "launch.cuh"

namespace sma::cuda {

void local_attention_backward(const LocalAttentionConfig& cfg, const LocalAttentionInputs& in,
                              const float* bias_table, const float* out, const float* row_stat, const float* dout,
                              float* dq, float* dk, float* dv, float* dbias_table, void* stream) {
  using Tr = attn::DefaultTraits;
  const char* where = "cuda::local_attention_backward";
  attn::validate(cfg, in, bias_table, where);
  const bool softmax = cfg.activation == Activation::softmax;
  const int table_size = cfg.bias_table_size();
  if (table_size > 0 && !dbias_table)
    throw ValueError(str_cat(where, ": dbias_table is nullptr but ", attn::position_name(cfg.position),
                             " positions have a ", table_size, "-entry table"));
  if (in.capacity == 0) return;
  if ((!dout && !in.dout_padded) || !dq || !dk || !dv)
    throw ValueError(str_cat(where, ": dout, dq, dk or dv is nullptr"));
  if (softmax && (!out || !row_stat))
    throw ValueError(str_cat(where, ": the softmax backward needs the forward's out and row_stat"));
  if (softmax && !dout)
    throw ValueError(str_cat(where, ": the softmax backward needs the fp32 dout (its row deltas), dout_padded or not"));

  const auto s = static_cast<cudaStream_t>(stream);
  attn::AsyncWorkspace ws(s);
  attn::LocalAttentionBackwardParams p{};
  static_cast<attn::LocalAttentionParams&>(p) = attn::make_params(cfg, in, bias_table);
  p.vec_h = p.vec_h && attn::aligned16(dout);
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  if (softmax) {
    float* delta = ws.alloc<float>(in.capacity);
    const int blocks = static_cast<int>(std::min<long long>((in.capacity + 7) / 8, 132LL * 32));
    attn::row_delta_kernel<<<blocks, 256, 0, s>>>(dout, out, in.h, in.offsets, in.batch, delta);
    SMA_CUDA_CHECK_LAUNCH();
    p.lse = row_stat;
    p.delta = delta;
  }
  if (cfg.bf16) {
    attn::local_attention_backward_bf16(cfg, in, p, dbias_table, s);
    return;
  }
  attn::rotate_qk(cfg, in, p, ws, s);
  const int rows = attn::row_blocks(in.capacity);
  // With a bias table the dq kernel writes dS into a band, and the bf16 path's band_dbias_kernel sums it (one
  // block per 64 queries, as the dq kernel's CTAs).
  const attn::BandGeometry band(cfg, in.capacity);
  static_assert(Tr::kBlockM == attn::kBandRows, "the dS band's blocks are the dq kernel's CTAs");
  if (table_size > 0) {
    p.dbias_partial = ws.alloc<double>(static_cast<long long>(rows) * table_size);
    p.dbias_range = ws.alloc<int>(2LL * rows);
    p.dsband = ws.alloc<float>(band.band());
    p.band_wpad = band.wpad;
    p.band_width = band.width;
  }
  const dim3 dv_grid(rows, attn::col_blocks(in.h));
  if (p.drop_threshold > 0) {
    attn::local_attention_dq_kernel<Tr, true><<<rows, Tr::kThreads, 0, s>>>(p);
    attn::local_attention_dkv_kernel<Tr, false, true><<<rows, Tr::kThreads, 0, s>>>(p);
    attn::local_attention_dkv_kernel<Tr, true, true><<<dv_grid, Tr::kThreads, 0, s>>>(p);
  } else {
    attn::local_attention_dq_kernel<Tr><<<rows, Tr::kThreads, 0, s>>>(p);
    attn::local_attention_dkv_kernel<Tr, false><<<rows, Tr::kThreads, 0, s>>>(p);
    attn::local_attention_dkv_kernel<Tr, true><<<dv_grid, Tr::kThreads, 0, s>>>(p);
  }
  SMA_CUDA_CHECK_LAUNCH();
  if (table_size > 0) {
    attn::band_dbias_kernel<<<rows, 256, 0, s>>>(p, attn::band_params(band, 0), p.dsband);
    SMA_CUDA_CHECK_LAUNCH();
    attn::bias_reduce_kernel<<<attn::bias_reduce_blocks(table_size), 256, 0, s>>>(p.dbias_partial, p.dbias_range,
                                                                                 rows, table_size, dbias_table);
    SMA_CUDA_CHECK_LAUNCH();
  }
  if (cfg.position == Position::rotary) {
    attn::launch_rotary(dq, dq, in, cfg.rotary_theta, -1.0, s);
    attn::launch_rotary(dk, dk, in, cfg.rotary_theta, -1.0, s);
  }
}

}  // namespace sma::cuda
