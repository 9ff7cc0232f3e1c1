// tests/cuda/emulation/cuda_bf16.h: a HOST stand-in for the few bf16 features of <cuda_bf16.h> that
// cuda/seqboat/padded_operands.cuh uses (storage types, round-to-nearest-even conversions), plus float2, for the
// host emulation beside it (cuda_runtime.h). Never used by the build.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  std::uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float a, float b) { return {a, b}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  return {static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
