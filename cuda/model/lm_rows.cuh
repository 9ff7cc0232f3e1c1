// cuda/model/lm_rows.cuh: the LM's row passes that do not depend on a sequence (the token embedding, a feed-forward
// block's forward, where each row's output reads that row only), shared by SeqBoatLmDevice's forward over B*L rows
// and the streamer's step over B rows (cuda/model/seqboat_lm_stream.cu). Definitions in cuda/model/seqboat_lm.cu.
#pragma once

#include <sma/cuda/dropout.hpp>
#include <sma/cuda/layer_ops.hpp>
#include <sma/cuda/seqboat_lm_device.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace sma::cuda::detail {

/// The value of *bad while no bad token has been seen.
constexpr unsigned long long kNoBadToken = ~0ULL;

/// h (rows, D) = scale * E[tokens[r]] per row r; 0 at padded rows (pad may be nullptr) and at tokens outside
/// [0, V), the first of which is kept in *bad as (row << 32 | token bits), the smallest row winning (atomicMin, so
/// *bad must start at kNoBadToken or at an earlier report).
void embed_rows(long long rows, int D, int V, float scale, const int* tokens, const std::uint8_t* pad,
                const float* E, float* h, unsigned long long* bad, cudaStream_t s);

/// A normalised feed-forward block's shape and weights (sma::Ffn; nb is nullptr unless layernorm).
struct FfnRowPass {
  int D = 0, H = 0;
  bool prenorm = true;
  NormKind norm = NormKind::layernorm;
  float eps = 1e-5f;
  DeviceActivation act = DeviceActivation::silu;
  const float *nw = nullptr, *nb = nullptr, *w1 = nullptr, *b1 = nullptr, *w2 = nullptr, *b2 = nullptr;
};

/// Scratch of ffn_forward_rows for `rows` rows: pre, h (rows, H); mean, rstd (rows); in1 (rows, D) when prenorm
/// (fc1's input, norm(x)), z (rows, D) when post-norm (x + the block's output, the norm's input).
struct FfnRowScratch {
  float *in1 = nullptr, *pre = nullptr, *h = nullptr, *z = nullptr, *mean = nullptr, *rstd = nullptr;
  float* o = nullptr;  ///< (rows, D) fc2's output before the output dropout (only with that dropout)
};

/// y (rows, D) = the block applied to x (rows, D); y may not alias x. With masks (`hidden`, `out` with a draw:
/// training) the block's dropout, the output one needing t.o. Queued on s (cuBLAS on `blas`, whose stream
/// the caller has set to s); nothing allocated.
void ffn_forward_rows(cublasHandle_t blas, const FfnRowPass& f, long long rows, const float* x, float* y,
                      const FfnRowScratch& t, cudaStream_t s, const DropoutArgs& hidden = {},
                      const DropoutArgs& out = {});

/// The row passes of an LM's parameters, read in place (valid while the LM lives): the embedding (V, D) and its
/// scale, each layer's feed-forward block (empty without blocks), the final norm's weight and bias (prenorm; the
/// bias nullptr unless layernorm).
struct LmRowPasses {
  const float* embedding = nullptr;
  float embed_scale = 1.f;
  std::vector<FfnRowPass> ffns;
  const float *final_w = nullptr, *final_b = nullptr;
};
LmRowPasses lm_row_passes(const SeqBoatLmDevice& lm);

}  // namespace sma::cuda::detail
