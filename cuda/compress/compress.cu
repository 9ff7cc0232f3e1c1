// Device compress / extract (include/sma/cuda/compress.hpp): stream compaction per batch row with CUB block scans.
// Launches never wait for the host: S = offsets[B] is read by each kernel, grids are sized for the B*L bound.
#include <sma/cuda/compress.hpp>

#include "../common/check.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace sma::cuda {
namespace {

constexpr int kThreads = 256;
using BlockReduce = cub::BlockReduce<int, kThreads>;
using BlockScan = cub::BlockScan<int, kThreads>;

struct MaxOp {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// One block per batch row: how many of its L tokens are active.
__global__ void __launch_bounds__(kThreads) count_active_kernel(const std::uint8_t* __restrict__ active, int length,
                                                                int* __restrict__ num_active) {
  const std::uint8_t* row = active + static_cast<long long>(blockIdx.x) * length;
  int c = 0;
  for (int t = threadIdx.x; t < length; t += kThreads) c += row[t] != 0;
  __shared__ typename BlockReduce::TempStorage tmp;
  const int total = BlockReduce(tmp).Sum(c);
  if (threadIdx.x == 0) num_active[blockIdx.x] = total;
}

// One block: the mode (compressed or the reference's uncompressed fallback) and the row offsets.
__global__ void __launch_bounds__(kThreads) plan_offsets_kernel(const int* __restrict__ num_active, int batch,
                                                                int length, int per_row, int* __restrict__ offsets,
                                                                int* __restrict__ compressed) {
  __shared__ typename BlockReduce::TempStorage red;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int s_max;
  int m = 0;
  for (int b = threadIdx.x; b < batch; b += kThreads) m = max(m, num_active[b]);
  const int mx = BlockReduce(red).Reduce(m, MaxOp{});
  if (threadIdx.x == 0) s_max = mx;
  __syncthreads();
  const bool comp = per_row != 0 || s_max < length;
  if (threadIdx.x == 0) *compressed = comp ? 1 : 0;
  if (s_max == 0) {  // nothing active: S = 0
    for (int b = threadIdx.x; b <= batch; b += kThreads) offsets[b] = 0;
    return;
  }
  if (!comp) {  // every position is a slot
    for (int b = threadIdx.x; b <= batch; b += kThreads) offsets[b] = b * length;
    return;
  }
  int carry = 0;
  for (int base = 0; base < batch; base += kThreads) {
    const int b = base + threadIdx.x;
    const int v = b < batch ? num_active[b] : 0;
    int ex = 0, total = 0;
    BlockScan(scan).ExclusiveSum(v, ex, total);
    if (b < batch) offsets[b] = carry + ex;
    carry += total;
    __syncthreads();  // the scan's temporary storage is reused by the next tile
  }
  if (threadIdx.x == 0) offsets[batch] = carry;
}

// One block per batch row: each active token's rank within its row (block scan, tile by tile) gives its slot.
__global__ void __launch_bounds__(kThreads) scatter_slots_kernel(const std::uint8_t* __restrict__ active, int batch,
                                                                 int length, const int* __restrict__ offsets,
                                                                 const int* __restrict__ compressed,
                                                                 int* __restrict__ token, int* __restrict__ positions,
                                                                 std::uint8_t* __restrict__ key_valid,
                                                                 int* __restrict__ slot_of) {
  const int b = blockIdx.x;
  int* row_slot = slot_of + static_cast<long long>(b) * length;
  if (offsets[batch] == 0) {
    for (int t = threadIdx.x; t < length; t += kThreads) row_slot[t] = -1;
    return;
  }
  const int base = offsets[b];
  const std::uint8_t* row = active + static_cast<long long>(b) * length;
  if (*compressed == 0) {
    for (int t = threadIdx.x; t < length; t += kThreads) {
      const int s = base + t;
      token[s] = b * length + t;
      positions[s] = t;
      key_valid[s] = row[t] != 0 ? 1 : 0;
      row_slot[t] = s;
    }
    return;
  }
  __shared__ typename BlockScan::TempStorage scan;
  int carry = 0;
  for (int t0 = 0; t0 < length; t0 += kThreads) {
    const int t = t0 + threadIdx.x;
    const int f = (t < length && row[t] != 0) ? 1 : 0;
    int ex = 0, total = 0;
    BlockScan(scan).ExclusiveSum(f, ex, total);
    if (f) {
      const int s = base + carry + ex;
      token[s] = b * length + t;
      positions[s] = t;
      key_valid[s] = 1;
    }
    if (t < length) row_slot[t] = f ? base + carry + ex : -1;
    carry += total;
    __syncthreads();
  }
}

__device__ __forceinline__ int slot_count(const int* offsets, int batch) { return offsets[batch]; }

__global__ void compress_kernel(const float* __restrict__ x, int d, const int* __restrict__ offsets, int batch,
                                const int* __restrict__ token, float* __restrict__ xc) {
  const long long n = static_cast<long long>(slot_count(offsets, batch)) * d;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long s = idx / d, c = idx - s * d;
    xc[idx] = x[static_cast<long long>(token[s]) * d + c];
  }
}

__global__ void compress_backward_kernel(const float* __restrict__ dxc, int d, const int* __restrict__ offsets,
                                         int batch, const int* __restrict__ token, float* __restrict__ dx) {
  const long long n = static_cast<long long>(slot_count(offsets, batch)) * d;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long s = idx / d, c = idx - s * d;
    dx[static_cast<long long>(token[s]) * d + c] += dxc[idx];
  }
}

__global__ void extract_add_kernel(const float* __restrict__ hc, int d, const int* __restrict__ offsets, int batch,
                                   const int* __restrict__ token, const std::uint8_t* __restrict__ key_valid,
                                   const float* __restrict__ gate, float* __restrict__ out) {
  const long long n = static_cast<long long>(slot_count(offsets, batch)) * d;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long s = idx / d, c = idx - s * d;
    if (!key_valid[s]) continue;
    const long long tok = token[s];
    out[tok * d + c] += gate[tok] * hc[idx];
  }
}

// One warp per slot; the dot product is reduced in a fixed order, so dgate is deterministic.
__global__ void extract_backward_kernel(const float* __restrict__ hc, int d, const int* __restrict__ offsets,
                                        int batch, const int* __restrict__ token,
                                        const std::uint8_t* __restrict__ key_valid, const float* __restrict__ gate,
                                        const float* __restrict__ dout, float* __restrict__ dhc,
                                        float* __restrict__ dgate) {
  const int S = slot_count(offsets, batch);
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; s < S; s += warps) {
    const long long tok = token[s];
    const bool valid = key_valid[s] != 0;
    const float g = gate[tok];
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) {
      const float go = dout[tok * d + c];
      dhc[static_cast<long long>(s) * d + c] = valid ? g * go : 0.f;
      if (valid) acc = fmaf(go, hc[static_cast<long long>(s) * d + c], acc);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0 && valid) dgate[tok] = acc;
  }
}

int elementwise_blocks(long long n) {
  const long long blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<long long>(std::max<long long>(blocks, 1), 132LL * 32));
}

void check_view(const CompressionView& p, const char* where) {
  if (p.batch < 0 || p.length < 0)
    throw ValueError(str_cat(where, ": plan has batch ", p.batch, ", length ", p.length, " (must be >= 0)"));
  if (!p.offsets || !p.compressed || (p.batch > 0 && !p.num_active) ||
      (p.capacity() > 0 && (!p.token || !p.positions || !p.key_valid || !p.slot)))
    throw ValueError(str_cat(where, ": the plan has a null device pointer"));
}

void check_width(int d, const char* where) {
  if (d < 0) throw ValueError(str_cat(where, ": width d must be >= 0, got ", d));
}

template <class... P>
void require_pointers(const char* where, const P*... ptrs) {
  if (((ptrs == nullptr) || ...)) throw ValueError(str_cat(where, ": a tensor argument is nullptr"));
}

}  // namespace

void plan_compression(const std::uint8_t* active, CompressionSemantics semantics, const CompressionView& plan,
                      void* stream) {
  check_view(plan, "cuda::plan_compression");
  if (plan.capacity() > 0) require_pointers("cuda::plan_compression", active);
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.batch > 0) {
    count_active_kernel<<<plan.batch, kThreads, 0, s>>>(active, plan.length, plan.num_active);
    SMA_CUDA_CHECK_LAUNCH();
  }
  plan_offsets_kernel<<<1, kThreads, 0, s>>>(plan.num_active, plan.batch, plan.length,
                                             semantics == CompressionSemantics::per_row ? 1 : 0, plan.offsets,
                                             plan.compressed);
  SMA_CUDA_CHECK_LAUNCH();
  if (plan.capacity() > 0) {
    scatter_slots_kernel<<<plan.batch, kThreads, 0, s>>>(active, plan.batch, plan.length, plan.offsets,
                                                         plan.compressed, plan.token, plan.positions, plan.key_valid,
                                                         plan.slot);
    SMA_CUDA_CHECK_LAUNCH();
  }
}

void compress(const float* x, int d, const CompressionView& plan, float* xc, void* stream) {
  check_view(plan, "cuda::compress");
  check_width(d, "cuda::compress");
  const long long n = plan.capacity() * d;
  if (n == 0) return;
  require_pointers("cuda::compress", x, xc);
  compress_kernel<<<elementwise_blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, d, plan.offsets, plan.batch, plan.token, xc);
  SMA_CUDA_CHECK_LAUNCH();
}

void compress_backward(const float* dxc, int d, const CompressionView& plan, float* dx, void* stream) {
  check_view(plan, "cuda::compress_backward");
  check_width(d, "cuda::compress_backward");
  const long long n = plan.capacity() * d;
  if (n == 0) return;
  require_pointers("cuda::compress_backward", dxc, dx);
  compress_backward_kernel<<<elementwise_blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      dxc, d, plan.offsets, plan.batch, plan.token, dx);
  SMA_CUDA_CHECK_LAUNCH();
}

void extract_add(const float* hc, int d, const CompressionView& plan, const float* gate, float* out, void* stream) {
  check_view(plan, "cuda::extract_add");
  check_width(d, "cuda::extract_add");
  const long long n = plan.capacity() * d;
  if (n == 0) return;
  require_pointers("cuda::extract_add", hc, gate, out);
  extract_add_kernel<<<elementwise_blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      hc, d, plan.offsets, plan.batch, plan.token, plan.key_valid, gate, out);
  SMA_CUDA_CHECK_LAUNCH();
}

void extract_backward(const float* hc, int d, const CompressionView& plan, const float* gate, const float* dout,
                      float* dhc, float* dgate, void* stream) {
  check_view(plan, "cuda::extract_backward");
  check_width(d, "cuda::extract_backward");
  const long long slots = plan.capacity();
  if (slots == 0) return;
  require_pointers("cuda::extract_backward", hc, gate, dout, dhc, dgate);
  const int warps_per_block = kThreads / 32;
  const int blocks = static_cast<int>(std::min<long long>((slots + warps_per_block - 1) / warps_per_block, 132LL * 64));
  extract_backward_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      hc, d, plan.offsets, plan.batch, plan.token, plan.key_valid, gate, dout, dhc, dgate);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace sma::cuda
