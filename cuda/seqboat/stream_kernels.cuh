// cuda/seqboat/stream_kernels.cuh: the device kernels of one streaming step of a causal SeqBoat layer for B streams
// (SeqBoatLayerStreamerDevice, include/sma/cuda/seqboat_stream_device.hpp; the CPU original is
// SeqBoatLayerStreamer::step_chunk in include/sma/models/seqboat_stream.hpp). They are written for 256-thread
// CTAs and use only what tests/cuda/emulation/cuda_runtime.h emulates, so that
// tests/cuda/emulation/emulate_stream.cpp can run them on a machine without a GPU.
//
// Every routing decision stays on the device: the router writes active[b], and each kernel reads it per row (an
// inactive row skips the attention, writes zeros where a product reads it, and leaves the ring untouched).
#pragma once

#include <cstdint>

namespace sma::cuda::stream {

constexpr int kThreads = 256;
constexpr int kScoreWarps = kThreads / 32;  // one warp per ring entry in score_kernel
constexpr int kValueCols = 32;              // value_kernel: 32 columns x 8 partitions of the ring per CTA
constexpr int kValueParts = kThreads / kValueCols;

enum : int { kPosNone = 0, kPosSimple = 1, kPosLocalSimple = 2, kPosRotary = 3 };  // sma::cuda::Position
enum : int { kActRelu2 = 0, kActSoftmax = 1, kActLaplace = 2 };                   // sma::cuda::Activation

/// Everything a step reads and writes (device pointers), passed by value to every kernel.
struct StepArgs {
  int B = 0, D = 0, N = 0, Z = 0, H = 0, W = 0, K = 0;  // K: EMA truncation (0 = none)
  int ldh = 0;                                           // row stride of hu = [2 logits | hx]
  int position = kPosNone, activation = kActRelu2, max_positions = 0;
  double rotary_theta = 10000.0;
  float query_scale = 1.f;
  // weights (the layer's own storage)
  const float *delta = nullptr, *alpha = nullptr, *beta = nullptr, *gamma = nullptr, *omega = nullptr;  // (D, N), (D)
  const float* hx_bias = nullptr;  // (2 + D)
  const float* mx_bias = nullptr;  // (Z + 2H)
  const float* qk_gamma = nullptr; // (2, Z)
  const float* qk_beta = nullptr;  // (2, Z)
  const float* h_bias = nullptr;   // (D)
  const float* table = nullptr;    // relative-position bias (simple, local_simple)
  // state
  float* ema = nullptr;            // (B, D, N)
  float* history = nullptr;        // (B, K, D)
  float* keys = nullptr;           // (B, W, Z), rotated
  float* values = nullptr;         // (B, W, H)
  long long* key_pos = nullptr;    // (B, W)
  long long* pos = nullptr;        // (B) tokens consumed
  long long* activated = nullptr;  // (B) tokens activated
  std::uint8_t* last_active = nullptr;
  float* last_gate = nullptr;
  // this step
  const float* x = nullptr;        // (B, D) the input (residual)
  const float* xin = nullptr;      // (B, D) the EMA's input (x or its pre-norm)
  float* mx = nullptr;             // (B, D) silu(EMA)
  float* hu = nullptr;             // (B, ldh) bias written by ema_step_kernel, the product added by cuBLAS
  const std::uint8_t* active = nullptr;  // (B) router decisions
  const float* gate = nullptr;     // (B)
  const float* base = nullptr;     // (B, Z + 2H) mx_proj without bias
  float *q = nullptr, *k = nullptr;  // (B, Z) prepared query (rotated, scaled), key (rotated)
  float *r = nullptr, *v = nullptr;  // (B, H)
  float* scores = nullptr;         // (B, W + 1) raw scores; entry n = min(activated, W) is the token's own key
  float* hr = nullptr;             // (B, H) attention * r (zero for inactive rows)
  const float* hc = nullptr;       // (B, D) h_proj without bias
  float* out = nullptr;            // (B, D) silu(hx + gate h + x), before a post-norm
};

__device__ __forceinline__ float stream_silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float stream_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

/// Ring entries row b attends to besides its own key.
__device__ __forceinline__ int memory_size(const StepArgs& a, int b) {
  const long long act = a.activated[b];
  return act < a.W ? static_cast<int>(act) : a.W;
}

// One thread per (row, channel): the EMA recurrence over the N orders (coefficients from the raw parameters, so a
// changed parameter is used at once), mx = silu(out), the truncation ring, and hu's bias (the product adds to it).
__global__ void ema_step_kernel(StepArgs a) {
  const long long total = static_cast<long long>(a.B) * a.D;
  const float cscale = sqrtf(1.f / static_cast<float>(a.N));
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(i / a.D), d = static_cast<int>(i % a.D);
    const float x = a.xin[i];
    const long long pos = a.pos[b];
    const bool drop = a.K > 0 && pos >= a.K;
    float* hist = a.K > 0 ? a.history + (static_cast<long long>(b) * a.K + pos % a.K) * a.D : nullptr;
    const float xo = drop ? hist[d] : 0.f;
    float acc = a.omega[d] * x;
    float* s = a.ema + i * a.N;
    for (int n = 0; n < a.N; ++n) {
      const int j = d * a.N + n;
      const float p = stream_sigmoid(a.delta[j]), al = stream_sigmoid(a.alpha[j]);
      const float q = 1.f - p * al, bc = p * a.beta[j], c = a.gamma[j] * cscale;
      float sn = q * s[n] + bc * x;
      if (drop) sn -= bc * powf(q, static_cast<float>(a.K - 1)) * q * xo;
      s[n] = sn;
      acc += c * sn;
    }
    if (hist) hist[d] = x;
    a.mx[i] = stream_silu(acc);
    float* hu = a.hu + static_cast<long long>(b) * a.ldh;
    hu[2 + d] = a.hx_bias[2 + d];
    if (d < 2) hu[d] = a.hx_bias[d];
  }
}

// One CTA per row: q, k (rotated by the token's position for rotary; q scaled), r, v of an activated token.
__global__ void __launch_bounds__(kThreads) prep_kernel(StepArgs a) {
  const int Z = a.Z, H = a.H, P = Z + 2 * H;
  for (int b = blockIdx.x; b < a.B; b += gridDim.x) {
    if (!a.active[b]) continue;
    const float* br = a.base + static_cast<long long>(b) * P;
    float* q = a.q + static_cast<long long>(b) * Z;
    float* k = a.k + static_cast<long long>(b) * Z;
    if (a.position == kPosRotary) {
      const double pos = static_cast<double>(a.pos[b]);
      for (int m = threadIdx.x; m < Z / 2; m += blockDim.x) {
        float qq[2], kk[2];
        for (int e = 0; e < 2; ++e) {
          const int c = 2 * m + e;
          const float z = stream_silu(br[c] + a.mx_bias[c]);
          qq[e] = z * a.qk_gamma[c] + a.qk_beta[c];
          kk[e] = z * a.qk_gamma[Z + c] + a.qk_beta[Z + c];
        }
        const double inv = 1.0 / pow(a.rotary_theta, static_cast<double>(2 * m) / static_cast<double>(Z));
        double sn, cs;
        sincos(pos * inv, &sn, &cs);
        q[2 * m] = static_cast<float>(qq[0] * cs - qq[1] * sn) * a.query_scale;
        q[2 * m + 1] = static_cast<float>(qq[0] * sn + qq[1] * cs) * a.query_scale;
        k[2 * m] = static_cast<float>(kk[0] * cs - kk[1] * sn);
        k[2 * m + 1] = static_cast<float>(kk[0] * sn + kk[1] * cs);
      }
    } else {
      for (int c = threadIdx.x; c < Z; c += blockDim.x) {
        const float z = stream_silu(br[c] + a.mx_bias[c]);
        q[c] = (z * a.qk_gamma[c] + a.qk_beta[c]) * a.query_scale;
        k[c] = z * a.qk_gamma[Z + c] + a.qk_beta[Z + c];
      }
    }
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      a.r[static_cast<long long>(b) * H + h] = stream_silu(br[Z + h] + a.mx_bias[Z + h]);
      a.v[static_cast<long long>(b) * H + h] = stream_silu(br[Z + H + h] + a.mx_bias[Z + H + h]);
    }
  }
}

// Grid (ceil((W+1)/8), B): one warp per ring entry j < n and one for the token's own key (j = n); score = q'.k' +
// bias. The relative positions: simple from original positions, local_simple from activated-token ordinals (ring
// slot j holds the latest ordinal o < activated with o = j mod W).
__global__ void __launch_bounds__(kThreads) score_kernel(StepArgs a) {
  const int b = blockIdx.y;
  if (!a.active[b]) return;
  const int n = memory_size(a, b);
  const int j = blockIdx.x * kScoreWarps + static_cast<int>(threadIdx.x / 32), lane = threadIdx.x % 32;
  if (j > n) return;  // whole warps leave together
  const float* q = a.q + static_cast<long long>(b) * a.Z;
  const float* key = j < n ? a.keys + (static_cast<long long>(b) * a.W + j) * a.Z : a.k + static_cast<long long>(b) * a.Z;
  float dot = 0.f;
  for (int c = lane; c < a.Z; c += 32) dot += q[c] * key[c];
  for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane != 0) return;
  if (a.position == kPosSimple) {
    const long long pq = a.pos[b], pk = j < n ? a.key_pos[static_cast<long long>(b) * a.W + j] : pq;
    long long idx = static_cast<long long>(a.max_positions) - 1 + (pk - pq);
    const long long top = 2 * static_cast<long long>(a.max_positions) - 2;
    idx = idx < 0 ? 0 : (idx > top ? top : idx);
    dot += a.table[idx];
  } else if (a.position == kPosLocalSimple) {
    const long long act = a.activated[b];
    const long long d = j < n ? -1 - ((act - 1 - j) % a.W) : 0;  // ordinal difference, in [-W, -1]
    dot += a.table[4LL * a.W - 1 + d];
  }
  a.scores[static_cast<long long>(b) * (a.W + 1) + j] = dot;
}

__device__ __forceinline__ float attention_weight(int activation, float s, float mx, float inv_sum) {
  if (activation == kActRelu2) {
    const float t = s > 0.f ? s : 0.f;
    return t * t;
  }
  if (activation == kActSoftmax) return expf(s - mx) * inv_sum;
  constexpr float kMu = 0.70710678118654752440f;
  constexpr float kInvSigmaSqrt2 = static_cast<float>(1.0 / (0.28209479177387814347 * 1.41421356237309504880));
  return 0.5f * (1.f + erff((s - kMu) * kInvSigmaSqrt2));
}

// Block-wide reduction of v over the 256 threads (max when `is_max`, else sum); every thread gets the result.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) {
      const float o = red[threadIdx.x + w];
      red[threadIdx.x] = is_max ? fmaxf(red[threadIdx.x], o) : red[threadIdx.x] + o;
    }
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

// Grid (ceil(H/32), B): hr[b, h] = r[b, h] * sum_j weight_j value_j[h] over the n ring entries and the own value.
// Each CTA takes 32 columns; its 8 warps split the entries, and the partial sums are added in a fixed order.
__global__ void __launch_bounds__(kThreads) value_kernel(StepArgs a) {
  __shared__ float red[kThreads];
  __shared__ float weight[kThreads];
  const int b = blockIdx.y;
  const int col = blockIdx.x * kValueCols + static_cast<int>(threadIdx.x % kValueCols);
  const int part = static_cast<int>(threadIdx.x / kValueCols);
  const long long row_h = static_cast<long long>(b) * a.H;
  if (!a.active[b]) {
    if (part == 0 && col < a.H) a.hr[row_h + col] = 0.f;
    return;  // the whole CTA
  }
  const int n = memory_size(a, b);
  const float* sc = a.scores + static_cast<long long>(b) * (a.W + 1);
  float mx = 0.f, inv_sum = 1.f;
  if (a.activation == kActSoftmax) {
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j <= n; j += kThreads) m = fmaxf(m, sc[j]);
    mx = block_reduce(m, true, red);
    float s = 0.f;
    for (int j = threadIdx.x; j <= n; j += kThreads) s += expf(sc[j] - mx);
    inv_sum = 1.f / block_reduce(s, false, red);
  }
  float acc = 0.f;
  for (int j0 = 0; j0 <= n; j0 += kThreads) {
    const int jj = j0 + static_cast<int>(threadIdx.x);
    if (jj <= n) weight[threadIdx.x] = attention_weight(a.activation, sc[jj], mx, inv_sum);
    __syncthreads();
    const int count = n + 1 - j0 < kThreads ? n + 1 - j0 : kThreads;
    if (col < a.H)
      for (int t = part; t < count; t += kValueParts) {
        const int j = j0 + t;
        const float val = j < n ? a.values[(static_cast<long long>(b) * a.W + j) * a.H + col] : a.v[row_h + col];
        acc += weight[t] * val;
      }
    __syncthreads();
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  if (part == 0 && col < a.H) {
    float total = 0.f;
    for (int p = 0; p < kValueParts; ++p) total += red[p * kValueCols + threadIdx.x];
    a.hr[row_h + col] = total * a.r[row_h + col];
  }
}

// One CTA per row: out = silu(hx + gate (hc + bias) + x); an activated token's k, v and position then take ring slot
// activated mod W (after value_kernel has read the ring), and the counters advance.
__global__ void __launch_bounds__(kThreads) output_kernel(StepArgs a) {
  const int b = blockIdx.x;
  const bool on = a.active[b] != 0;
  const float g = a.gate[b];
  const long long pos = a.pos[b], act = a.activated[b];
  const long long rd = static_cast<long long>(b) * a.D;
  const float* hx = a.hu + static_cast<long long>(b) * a.ldh + 2;
  for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
    float pre = hx[d];
    if (on) pre += g * (a.hc[rd + d] + a.h_bias[d]);
    pre += a.x[rd + d];
    a.out[rd + d] = stream_silu(pre);
  }
  if (on) {
    const long long slot = static_cast<long long>(b) * a.W + act % a.W;
    for (int c = threadIdx.x; c < a.Z; c += blockDim.x) a.keys[slot * a.Z + c] = a.k[static_cast<long long>(b) * a.Z + c];
    for (int h = threadIdx.x; h < a.H; h += blockDim.x)
      a.values[slot * a.H + h] = a.v[static_cast<long long>(b) * a.H + h];
  }
  __syncthreads();  // every thread has read pos and activated
  if (threadIdx.x == 0) {
    if (on) {
      a.key_pos[static_cast<long long>(b) * a.W + act % a.W] = pos;
      a.activated[b] = act + 1;
    }
    a.pos[b] = pos + 1;
    a.last_active[b] = on ? 1 : 0;
    a.last_gate[b] = g;
  }
}

}  // namespace sma::cuda::stream
