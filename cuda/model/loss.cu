// Softmax cross-entropy on the device (include/sma/cuda/loss.hpp) in three launches: one block counts the rows and
// finds the first bad label, a grid of warps (one row each) takes the rows' losses and gradients, and one block sums
// the row losses in a fixed order. A classifier's batch is a few rows, an LM's B*L rows of V logits: the rows pass
// scales with the grid, and the result stays deterministic.
#include <sma/cuda/loss.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_runtime.h>

#include <cmath>

namespace sma::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32, kSumThreads = 512;

// head[0] = counted rows, head[1] = the first row whose label is neither `ignore` nor in [0, C) (rows if none).
__global__ void __launch_bounds__(kSumThreads) count_rows_kernel(int rows, int C, const int* __restrict__ labels,
                                                                 int ignore, int* __restrict__ head) {
  __shared__ int counted, bad_row;
  if (threadIdx.x == 0) {
    counted = 0;
    bad_row = rows;
  }
  __syncthreads();
  int mine = 0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int y = labels[r];
    if (y == ignore) continue;
    if (y < 0 || y >= C)
      atomicMin(&bad_row, r);
    else
      ++mine;
  }
  atomicAdd(&counted, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    head[0] = counted;
    head[1] = bad_row;
  }
}

__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(int rows, int C, const float* __restrict__ logits,
                                                                      const int* __restrict__ labels, int ignore,
                                                                      const int* __restrict__ head,
                                                                      float* __restrict__ dlogits,
                                                                      double* __restrict__ row_loss,
                                                                      int* __restrict__ row_correct) {
  const int n = head[0];
  const bool bad = head[1] < rows;
  const int lane = threadIdx.x % 32;
  for (int r = blockIdx.x * kWarps + threadIdx.x / 32; r < rows; r += gridDim.x * kWarps) {
    const float* lr = logits + static_cast<long long>(r) * C;
    const int y = labels[r];
    const bool use = y != ignore && y >= 0 && y < C && !bad;
    // max and its first index
    float mx = -INFINITY;
    int arg = C;
    for (int c = lane; c < C; c += 32)
      if (lr[c] > mx) mx = lr[c], arg = c;
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, mx, o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
      if (om > mx || (om == mx && oa < arg)) mx = om, arg = oa;
    }
    double s = 0;
    for (int c = lane; c < C; c += 32) s += exp(static_cast<double>(lr[c]) - mx);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const double lse = static_cast<double>(mx) + log(s);
    if (lane == 0) {
      row_loss[r] = use ? lse - static_cast<double>(lr[y]) : 0.0;
      row_correct[r] = use && arg == y ? 1 : 0;
    }
    if (dlogits) {
      float* dr = dlogits + static_cast<long long>(r) * C;
      for (int c = lane; c < C; c += 32)
        dr[c] = use && n > 0 ? static_cast<float>((exp(static_cast<double>(lr[c]) - lse) - (c == y ? 1.0 : 0.0)) / n)
                             : 0.f;
    }
  }
}

// Each thread sums a strided set of rows, then a fixed tree: the same order on every call.
__global__ void __launch_bounds__(kSumThreads) cross_entropy_sum_kernel(int rows, const int* __restrict__ labels,
                                                                        const int* __restrict__ head,
                                                                        const double* __restrict__ row_loss,
                                                                        const int* __restrict__ row_correct,
                                                                        double* __restrict__ result) {
  __shared__ double sum[kSumThreads];
  __shared__ long long correct[kSumThreads];
  double s = 0;
  long long k = 0;
  for (int r = threadIdx.x; r < rows; r += kSumThreads) {
    s += row_loss[r];
    k += row_correct[r];
  }
  sum[threadIdx.x] = s;
  correct[threadIdx.x] = k;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sum[threadIdx.x] += sum[threadIdx.x + w];
      correct[threadIdx.x] += correct[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int n = head[0], bad_row = head[1];
    const bool bad = bad_row < rows;
    result[0] = bad ? NAN : (n > 0 ? sum[0] / n : 0.0);
    result[1] = static_cast<double>(correct[0]);
    result[2] = static_cast<double>(n);
    result[3] = bad ? static_cast<double>(bad_row) : -1.0;
    result[4] = bad ? static_cast<double>(labels[bad_row]) : 0.0;
  }
}

}  // namespace

void cross_entropy(int rows, int classes, const float* logits, const int* labels, int ignore, float* dlogits,
                   double* result, void* stream) {
  if (rows < 0 || classes < 1)
    throw ValueError(str_cat("sma::cuda::cross_entropy: bad sizes rows=", rows, " classes=", classes));
  if (!result || (rows > 0 && (!logits || !labels)))
    throw ValueError("sma::cuda::cross_entropy: logits, labels and result must not be null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  detail::StreamWorkspace ws(s);
  double* row_loss = ws.alloc<double>(rows);
  int* row_correct = ws.alloc<int>(rows);
  int* head = ws.alloc<int>(2);
  count_rows_kernel<<<1, kSumThreads, 0, s>>>(rows, classes, labels, ignore, head);
  SMA_CUDA_CHECK_LAUNCH();
  if (rows > 0) {
    cross_entropy_rows_kernel<<<detail::grid_for(rows, kWarps), kThreads, 0, s>>>(
        rows, classes, logits, labels, ignore, head, dlogits, row_loss, row_correct);
    SMA_CUDA_CHECK_LAUNCH();
  }
  cross_entropy_sum_kernel<<<1, kSumThreads, 0, s>>>(rows, labels, head, row_loss, row_correct, result);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace sma::cuda
