// sma_bench_cuda_ema: times sma::cuda::ema_forward and forward+backward (CUDA events, median of the repetitions)
// at the shape (B 16 x L 4096, D 512, N 16) and the CIFAR training step's (B 50 x L 1024, D 160, N 16),
// causal and bidirectional, no padding, no truncation.
//   sma_bench_cuda_ema [reps=20]      one line per (shape, direction): forward ms, forward+backward ms
//   sma_bench_cuda_ema profile        one warm-up and one forward+backward per (shape, direction), for ncu
// It uses only sma/cuda/ema.hpp and the CUDA runtime, so that it also builds against another ema.cu (a before/after
// comparison in one device call: nvcc bench_cuda_ema.cpp OLD/ema.cu). Not a test: run it by hand on a GPU machine.
#include <sma/cuda/ema.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

float* device_random(std::size_t n, float lo, float hi, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> h(n);
  for (float& v : h) v = u(rng);
  float* d = nullptr;
  check(cudaMalloc(&d, n * sizeof(float)), "cudaMalloc");
  check(cudaMemcpy(d, h.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

struct Case {
  const char* name;
  int B, L, D, N;
};

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: nothing to time\n");
    return 0;
  }
  const bool profile = argc > 1 && std::string(argv[1]) == "profile";
  const int reps = !profile && argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  const char* seg = std::getenv("SMA_CUDA_EMA_SEG");
  std::printf("# %s, reps %d, SMA_CUDA_EMA_SEG=%s\n", prop.name, reps, seg ? seg : "(unset)");
  cudaStream_t s;
  check(cudaStreamCreate(&s), "cudaStreamCreate");
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  check(cudaEventCreate(&e1), "cudaEventCreate");
  const Case cases[] = {{"issue", 16, 4096, 512, 16}, {"train", 50, 1024, 160, 16}};
  for (const Case& c : cases)
    for (const bool bidir : {false, true}) {
      sma::cuda::EmaConfig cfg;
      cfg.batch = c.B;
      cfg.length = c.L;
      cfg.dim = c.D;
      cfg.order = c.N;
      cfg.bidirectional = bidir;
      const std::size_t n = static_cast<std::size_t>(c.B) * c.L * c.D, rn = static_cast<std::size_t>(cfg.rows()) * c.N;
      float* x = device_random(n, -1.f, 1.f, 1);
      float* dy = device_random(n, -1.f, 1.f, 2);
      float *out = nullptr, *dx = nullptr;
      check(cudaMalloc(&out, n * sizeof(float)), "cudaMalloc");
      check(cudaMalloc(&dx, n * sizeof(float)), "cudaMalloc");
      const sma::cuda::EmaParams prm{device_random(rn, -2.f, 2.f, 3), device_random(rn, -2.f, 2.f, 4),
                                     device_random(rn, -1.f, 1.f, 5), device_random(rn, -1.f, 1.f, 6),
                                     device_random(static_cast<std::size_t>(c.D), -1.f, 1.f, 7)};
      const sma::cuda::EmaGrads grads{device_random(rn, 0.f, 0.f, 8), device_random(rn, 0.f, 0.f, 9),
                                      device_random(rn, 0.f, 0.f, 10), device_random(rn, 0.f, 0.f, 11),
                                      device_random(static_cast<std::size_t>(c.D), 0.f, 0.f, 12)};
      const auto fwd = [&] { sma::cuda::ema_forward(cfg, prm, x, nullptr, out, s); };
      const auto both = [&] {
        fwd();
        sma::cuda::ema_backward(cfg, prm, x, nullptr, dy, dx, grads, s);
      };
      const auto time = [&](auto&& f) {
        f();  // warm-up (memory pool, module load)
        check(cudaStreamSynchronize(s), "warm-up");
        std::vector<float> ms;
        for (int i = 0; i < reps; ++i) {
          check(cudaEventRecord(e0, s), "cudaEventRecord");
          f();
          check(cudaEventRecord(e1, s), "cudaEventRecord");
          check(cudaEventSynchronize(e1), "cudaEventSynchronize");
          float t = 0;
          check(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime");
          ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        return ms[ms.size() / 2];
      };
      if (profile) {
        both();
        both();
        check(cudaStreamSynchronize(s), "profile");
        std::printf("profiled %s %s\n", c.name, bidir ? "bidirectional" : "causal");
      } else {
        const float tf = time(fwd), tb = time(both);
        std::printf("ema %-5s B %2d L %4d D %3d N %2d %-13s segment %2d  forward %.3f ms  forward+backward %.3f ms\n",
                    c.name, c.B, c.L, c.D, c.N, bidir ? "bidirectional" : "causal", sma::cuda::ema_segment_length(cfg),
                    tf, tb);
      }
      for (float* p : {x, dy, out, dx, const_cast<float*>(prm.delta), const_cast<float*>(prm.alpha),
                       const_cast<float*>(prm.beta), const_cast<float*>(prm.gamma), const_cast<float*>(prm.omega),
                       grads.delta, grads.alpha, grads.beta, grads.gamma, grads.omega})
        cudaFree(p);
    }
  check(cudaStreamSynchronize(s), "end");
  return 0;
}
