// tests/cuda/emulation/cuda_runtime.h: a HOST EMULATION of the few CUDA features the local-attention kernels use,
// so their indexing can be checked on a machine without a GPU (docs/cuda.md, "Without a GPU"). It stands in for the
// real <cuda_runtime.h> when this folder comes first on the include path. One CTA = 256 std::threads; __shared__
// becomes function-static (CTAs run one after another); __syncthreads is a std::barrier of the CTA and
// __shfl_xor_sync a barrier of the warp. It proves the arithmetic, the tiling and the barriers' placement, not the
// memory model: racecheck/memcheck on a real device remain the word on races. Never used by the build.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3e { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local uint3e threadIdx, blockIdx;
inline dim3 blockDim(256), gridDim(1);

struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T> inline T __ldg(const T* p) { return *p; }
using std::min; using std::max;
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline void sincos(double a, double* s, double* c) { *s = std::sin(a); *c = std::cos(a); }

namespace emu {
inline std::barrier<>* bar = nullptr;
inline std::barrier<>* wbar[8];
inline float xbuf[1024];
inline std::mutex mu;
}
inline void __syncthreads() { emu::bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int o) {
  const unsigned t = threadIdx.x;
  auto* b = emu::wbar[t / 32];
  b->arrive_and_wait();
  emu::xbuf[t] = x;
  b->arrive_and_wait();
  float r = emu::xbuf[t ^ o];
  b->arrive_and_wait();
  return r;
}
inline int atomicMin(int* p, int v) { std::lock_guard<std::mutex> l(emu::mu); int o = *p; *p = std::min(o, v); return o; }
inline int atomicMax(int* p, int v) { std::lock_guard<std::mutex> l(emu::mu); int o = *p; *p = std::max(o, v); return o; }

namespace emu {
template <class F>
void launch(dim3 grid, F&& body) {
  gridDim = grid;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> b(256);
      bar = &b;
      std::vector<std::unique_ptr<std::barrier<>>> wb;
      for (int w = 0; w < 8; ++w) { wb.emplace_back(new std::barrier<>(32)); wbar[w] = wb.back().get(); }
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < 256; ++t)
        ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; body(); });
      for (auto& th : ts) th.join();
    }
}
}
namespace emu { inline double dbuf[1024]; }
inline double __shfl_xor_sync(unsigned, double x, int o) {
  const unsigned t = threadIdx.x;
  auto* b = emu::wbar[t / 32];
  b->arrive_and_wait();
  emu::dbuf[t] = x;
  b->arrive_and_wait();
  double r = emu::dbuf[t ^ o];
  b->arrive_and_wait();
  return r;
}
