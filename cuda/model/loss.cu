// Softmax cross-entropy on the device (include/sma/cuda/loss.hpp). One block: a classifier's batch is small, and
// one block sums the rows in a fixed order without a second launch.
#include <sma/cuda/loss.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_runtime.h>

#include <cmath>

namespace sma::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(int rows, int C, const float* __restrict__ logits,
                                                                 const int* __restrict__ labels, int ignore,
                                                                 float* __restrict__ dlogits,
                                                                 double* __restrict__ row_loss,
                                                                 int* __restrict__ row_correct,
                                                                 double* __restrict__ result) {
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
  const int n = counted;
  const bool bad = bad_row < rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
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
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0;
    long long correct = 0;
    for (int r = 0; r < rows; ++r) {
      sum += row_loss[r];
      correct += row_correct[r];
    }
    result[0] = bad ? NAN : (n > 0 ? sum / n : 0.0);
    result[1] = static_cast<double>(correct);
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
  cross_entropy_kernel<<<1, kThreads, 0, s>>>(rows, classes, logits, labels, ignore, dlogits, row_loss, row_correct,
                                               result);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace sma::cuda
