// sma/cuda/ema.hpp: the multi-head damped EMA of MEGA / SeqBoat on the device, fp32, forward and backward (the CUDA
// counterpart of sma::MultiHeadEma / sma/ops/ema.hpp; definitions in cuda/ema/). No CUDA header is included.
//
// WHAT (identical maths to MultiHeadEma; docs/maths/ema.md), R = D (causal) or 2D (bidirectional) kernel rows:
//     p = sigmoid(delta), a = sigmoid(alpha), q = 1 - p a, b = p beta, c = gamma / sqrt(N)
//     xm = x with padded positions (padding[b, t] != 0) set to 0
//     s_n[t] = q s_n[t-1] + b xm[t] - b q^K xm[t-K]       (rows 0..D-1 forward in time; the look-ahead rows
//     out[t] = sum_n c s_n[t] + omega x[t]                  D..2D-1 run the same recurrence backwards in time)
//   K = min(L, truncation), or L without truncation. This is the exact scan form of the convolution with the kernel
//   sum_n b c q^t (t < K), both halves including lag 0.
// ALGORITHM  A chunked scan. The sequence is cut into segments of `ema_segment_length` steps:
//     1. local pass: each segment's end state from a zero start;
//     2. carry pass: one thread per (batch row, kernel row, order) chains the segments, S_k = q^C S_{k-1} + local_k;
//     3. apply pass: each segment re-runs from its carried start state and writes its outputs.
//   Without truncation (K = L) one thread holds its whole segment (32 or 64 steps of one channel) in registers: x and
//   dout are read once per pass, both directions of a bidirectional EMA run from that read, orders are the outer
//   loop (any N), and the state is kept in units of x (one FMA per order and step). The backward runs the forward
//   state v and the adjoint lambda[t] = dout[t] + q lambda[t+1] (directions reversed for the look-ahead rows):
//   dx = sum_n w lambda, dw = sum G v, dq = w sum lambda v[t-1]. With truncation (K < L) or rows of more than
//   65535 segments the generic kernels run instead: up to 16 orders' states in registers, the drop term as one more
//   input, and dq from the forward-mode derivative u = dv/dq carried as (v, u) -> (q^C v, q^C u + C q^(C-1) v).
//   Per-segment partials of the parameter gradients are summed in double in a fixed order (deterministic).
//   No FFT: the scan is O(B L D N) with coalesced loads over channels and never a prime-sized transform.
//   State and accumulation in fp32; coefficients and the parameter chain rule in double.
// SHAPES (row-major float32, device memory)
//   x, out, dout, dx (B, L, D); padding (B, L) uint8 or nullptr; delta, alpha, beta, gamma (R, N) (PyTorch's
//   (R, N, 1) share this layout); omega (D). Gradients: same shapes, ADDED into.
// MEMORY  temporary device memory from cudaMallocAsync on the stream: forward B*ceil(L/C)*R*N floats, backward
//   twice that (three times on the generic path) plus B*ceil(L/C)*D, plus the coefficients (10 R N floats).
// ERRORS  ValueError for bad sizes or null pointers, CudaError for a failed CUDA call. Asynchronous on `stream`.
#pragma once

#include <cstdint>

namespace sma::cuda {

struct EmaConfig {
  int batch = 0;               ///< B >= 0
  int length = 0;              ///< L >= 0
  int dim = 0;                 ///< D >= 1
  int order = 0;               ///< N >= 1
  bool bidirectional = false;  ///< R = 2D kernel rows, the second half looking ahead
  int truncation = 0;          ///< kernel length cap K = min(L, truncation); 0 = none

  int rows() const { return bidirectional ? 2 * dim : dim; }
  int kernel_size() const { return truncation > 0 && truncation < length ? truncation : length; }
};

/// Device pointers to the parameters: delta, alpha, beta, gamma (R, N); omega (D).
struct EmaParams {
  const float* delta = nullptr;
  const float* alpha = nullptr;
  const float* beta = nullptr;
  const float* gamma = nullptr;
  const float* omega = nullptr;
};

/// Device pointers to the gradients, ADDED into (same shapes as EmaParams).
struct EmaGrads {
  float* delta = nullptr;
  float* alpha = nullptr;
  float* beta = nullptr;
  float* gamma = nullptr;
  float* omega = nullptr;
};

/// The segment length C the chunked scan's forward uses for this shape. Without truncation: 64 bidirectional, 32
/// causal (the environment variable SMA_CUDA_EMA_SEG = 16, 32 or 64 overrides it, for timing; the backward caps it
/// at 32) while a row has at most 65535 segments. Otherwise (generic path): a power of two, 32 to 4096, longer only when a row would otherwise have more
/// than 65535 segments (rows of more than 268M steps).
int ema_segment_length(const EmaConfig& cfg);

/// out (B, L, D) = EMA(x) + omega x. `padding` may be nullptr.
void ema_forward(const EmaConfig& cfg, const EmaParams& prm, const float* x, const std::uint8_t* padding, float* out,
                 void* stream = nullptr);

/// Writes dx (B, L, D) = (1 - pad) conv^T(dout) + omega dout [+ residual] and ADDS the parameter gradients into
/// `grads`. `x` and `padding` are the forward's inputs (nothing is kept between the calls). `residual` (B, L, D),
/// optional and not aliasing dx, is the gradient of a skip path around the EMA, added in the same pass.
void ema_backward(const EmaConfig& cfg, const EmaParams& prm, const float* x, const std::uint8_t* padding,
                  const float* dout, float* dx, const EmaGrads& grads, void* stream = nullptr,
                  const float* residual = nullptr);

}  // namespace sma::cuda
