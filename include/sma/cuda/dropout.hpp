// sma/cuda/dropout.hpp: the device layers' dropout masks, as a pure function of (seed, draw, site, element).
//
// WHY      A mask that is a function rather than a stored tensor costs no memory and no pass of its own: the kernel
//          that produces a value drops it, and the backward re-derives the same bits. The draw counter lives in
//          device memory and each training forward advances it on the stream, so a training step recorded as a
//          CUDA graph draws fresh masks at every replay with no host work. Host code (tests) can rebuild any mask.
// MASK     element i of site s in draw k of a layer seeded with `seed` is dropped when
//          bits(key(seed, k, s), i) < threshold(p) (about p of all elements); kept ones are scaled by 1 / (1 - p)
//          (inverted dropout, as PyTorch's nn.Dropout). Element indices are token-major: t * D + c for token t =
//          b * L + l of the (B, L, D) activations (the GAU's output too is indexed by its token, not its slot);
//          the GAU's v, which exists only for compressed rows, by its row: s * H + j.
// MATHS    splitmix64's finaliser (a bijection of 64-bit words with full avalanche) over a Weyl sequence of the
//          element index; the CPU layers draw their masks from std::mt19937_64 instead, so the two masks differ.
// Host header; no CUDA header is included (SMA_CUDA_HD adds __host__ __device__ under nvcc only).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SMA_CUDA_HD __host__ __device__ __forceinline__
#else
#define SMA_CUDA_HD inline
#endif

namespace sma::cuda {

/// Where a mask applies: SeqBoatLayerConfig::dropout's three places, and a feed-forward block's two (sma::Ffn).
enum class DropoutSite : std::uint32_t {
  mx = 1,          ///< silu(EMA output), before hx_proj and the compression
  hc = 2,          ///< bidirectional: the GAU's output (with h_proj's bias) before the gated extraction
  sum = 3,         ///< causal: hx + gate * h before the residual
  ffn_hidden = 4,  ///< the block's activation output (Ffn's hidden_dropout; the LM's activation_dropout)
  ffn_out = 5,     ///< fc2's output before the residual (Ffn's dropout)
  gau_v = 6,       ///< the GAU's v (its hidden_dropout), indexed by compressed row: s H + j
  attention = 7,   ///< the GAU's attention weights (attention_dropout): the key seeds the CPU op's pair mask
};

SMA_CUDA_HD std::uint64_t dropout_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// One (seed, draw, site)'s key; a kernel computes it once and hashes each element index with it.
SMA_CUDA_HD std::uint64_t dropout_key(std::uint64_t seed, std::uint64_t draw, DropoutSite site) {
  return dropout_mix(seed ^ dropout_mix(draw * 8 + static_cast<std::uint32_t>(site)));
}

/// 32 uniform bits for element `index`.
SMA_CUDA_HD std::uint32_t dropout_bits(std::uint64_t key, std::uint64_t index) {
  return static_cast<std::uint32_t>(dropout_mix(key + (index + 1) * 0x9E3779B97F4A7C15ull) >> 32);
}

/// The threshold for a rate p in [0, 1): elements whose bits fall below it are dropped.
inline std::uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t <= 0 ? 0u : t >= 4294967295.0 ? 4294967295u : static_cast<std::uint32_t>(t);
}

/// The mask's value for one element: 0 (dropped) or keep_scale = 1 / (1 - p).
SMA_CUDA_HD float dropout_scale(std::uint64_t key, std::uint64_t index, std::uint32_t threshold, float keep_scale) {
  return dropout_bits(key, index) < threshold ? 0.f : keep_scale;
}

/// What a kernel needs for one layer's dropout; `draw` null: no dropout (every scale is 1).
struct DropoutArgs {
  std::uint64_t seed = 0;
  const std::uint64_t* draw = nullptr;  ///< device memory: the current draw of the layer
  std::uint32_t threshold = 0;
  float keep_scale = 1.f;
};

}  // namespace sma::cuda
