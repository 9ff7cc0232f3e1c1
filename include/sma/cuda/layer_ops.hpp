// sma/cuda/layer_ops.hpp: the small per-token kernels of a SeqBoat layer on the device, fp32 (definitions in
// cuda/layer_ops/): the sequence norms (LayerNorm, RMSNorm, ScaleNorm), SiLU, the router (LatentConfigurator with
// two options), and deterministic column sums. No CUDA header is included; tensors are device pointers.
//
// NORMS (the CPU's sma::LayerNorm / RMSNorm / ScaleNorm, docs/maths/norms.md), per row of D channels:
//   layernorm  y = (x - mean) rstd * weight + bias,   rstd = 1/sqrt(var + eps)  (weight, bias (D) or nullptr)
//   rmsnorm    y = x rstd * weight,                   rstd = 1/sqrt(mean(x^2) + eps) (weight (D) or nullptr)
//   scalenorm  y = x rstd * scalar                    (scalar (1) or nullptr)
//   forward keeps mean (layernorm; nullptr allowed otherwise) and rstd per row; backward recomputes xhat from x and
//   ADDS the weight / bias gradients (summed in double over row chunks, in a fixed order).
// BATCHNORM (the CPU's sma::BatchNorm = nn.BatchNorm1d over (B, D, L)), per channel over all rows (B*L tokens;
//   padded tokens are counted, as the CPU layer and the reference do):
//   train  mean, var (biased) of the rows; y = (x - mean) invstd * weight + bias, invstd = 1/sqrt(var + eps);
//          running_mean = (1 - m) running_mean + m mean, running_var = (1 - m) running_var + m var N/(N-1),
//          num_batches_tracked += 1 (each of the three may be nullptr: not updated). Needs rows > 1.
//   eval   the same with running_mean, running_var (constants for the backward).
//   Channel sums in double over 256-row chunks, added in chunk order (deterministic).
// ROUTER  logits (rows, 2) with row stride ld, u = logits + (-shift/2, +shift/2); probs = softmax(u / exp(temp));
//   choice = argmax (ties -> 0); active = choice == 1 and not padding; gate = p_1 if active else 0.
//   backward: for active rows ds_m = dgate p_1 (delta_1m - p_m), dlogits = ds / tau; dtemp -= sum ds_m u_m / tau
//   (ADDED into *dtemp, deterministic); inactive rows get dlogits = 0.
// ERRORS  ValueError for bad sizes or null pointers, CudaError for failed launches. Asynchronous on `stream`.
#pragma once

#include <cstdint>

namespace sma::cuda {

/// batchnorm is not a per-row norm: norm_forward / norm_backward reject it, batchnorm_forward / _backward run it.
enum class NormKind : int { layernorm, rmsnorm, scalenorm, batchnorm };

/// y, x (rows, D); mean (rows) (layernorm only, else may be nullptr), rstd (rows).
void norm_forward(NormKind kind, long long rows, int D, float eps, const float* x, const float* weight,
                  const float* bias, float* y, float* mean, float* rstd, void* stream = nullptr);

/// dx (rows, D) assigned (may not alias dy); dweight / dbias ADDED (nullptr: skipped). With `residual` (rows, D),
/// dx = the norm's gradient + residual (the residual branch's gradient, added in the same pass).
void norm_backward(NormKind kind, long long rows, int D, const float* x, const float* weight, const float* mean,
                   const float* rstd, const float* dy, float* dx, float* dweight, float* dbias,
                   void* stream = nullptr, const float* residual = nullptr);

/// y, x (rows, D); mean, invstd (D) written (the statistics used: the batch's in training, the running ones in
/// eval); weight, bias (D) or nullptr; the running statistics updated in training (see above).
void batchnorm_forward(long long rows, int D, float eps, bool training, float momentum, const float* x,
                       const float* weight, const float* bias, float* running_mean, float* running_var,
                       float* num_batches_tracked, float* y, float* mean, float* invstd, void* stream = nullptr);

/// dx (rows, D) assigned (through the batch statistics when `training`, i.e. when the forward used them), plus
/// `residual` (rows, D) when given (a pre-norm layer's skip path); dweight += sum dy xhat, dbias += sum dy
/// (nullptr: skipped).
void batchnorm_backward(long long rows, int D, bool training, const float* x, const float* weight, const float* mean,
                        const float* invstd, const float* dy, float* dx, float* dweight, float* dbias,
                        void* stream = nullptr, const float* residual = nullptr);

/// y = x sigmoid(x), n elements (y may alias x).
void silu_forward(long long n, const float* x, float* y, void* stream = nullptr);
/// dx = dy silu'(x) (dx may alias dy).
void silu_backward(long long n, const float* x, const float* dy, float* dx, void* stream = nullptr);

/// Router forward over B*L rows. probs (B*L, 2), active (B*L) uint8, gate (B*L); padding (B, L) or nullptr.
void router_forward(int batch, int length, const float* logits, int ld, float shift, const float* temp,
                    const std::uint8_t* padding, float* probs, std::uint8_t* active, float* gate,
                    void* stream = nullptr);

/// Router backward: dlogits (rows, 2) with row stride ld_out (assigned), *dtemp ADDED.
void router_backward(long long rows, const float* logits, int ld, float shift, const float* temp, const float* probs,
                     const std::uint8_t* active, const float* dgate, float* dlogits, int ld_out, float* dtemp,
                     void* stream = nullptr);

/// out[c] += sum_r a[r, c] (a (rows, cols) with row stride lda; with b: sum_r a[r, c] b[r, c], same stride),
/// in double over chunks of rows, deterministic.
/// `bound` (device int, or nullptr): only rows r < min(rows, *bound) are summed, so a sum over compressed rows
/// costs what the routed count S costs, with S never leaving the device.
void column_sum_add(long long rows, int cols, const float* a, int lda, const float* b, float* out,
                    void* stream = nullptr, const int* bound = nullptr);
/// column_sum_add for n <= 4 matrices of one shape (rows, cols; row stride cols), out[i] += column sums of a[i], in
/// one partial and one finishing launch instead of n of each; bound as column_sum_add. Same sums, same order.
void column_sums_add(long long rows, int cols, int n, const float* const* a, float* const* out, void* stream = nullptr,
                     const int* bound = nullptr);
/// The finishing half of column_sums_add for partial sums that a producer kernel wrote itself: out[i][c] += the sum
/// over k < chunks of partial[(i chunks + k) cols + c] (double), in a fixed order, for n <= 4 matrices.
void column_partials_finish(int chunks, int cols, int n, const double* partial, float* const* out,
                            void* stream = nullptr);
/// column_sum_add over a bf16 matrix (a16: bf16 values as 16-bit words, row stride lda), no b.
void column_sum_add_bf16(long long rows, int cols, const void* a16, int lda, float* out, void* stream = nullptr,
                         const int* bound = nullptr);

}  // namespace sma::cuda
