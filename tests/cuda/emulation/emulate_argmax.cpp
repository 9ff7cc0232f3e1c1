// tests/cuda/emulation/emulate_argmax.cpp: runs the greedy-decoding argmax of SeqBoatLmStreamerDevice::generate
// (cuda/model/argmax_kernel.cuh) on the host (see cuda_runtime.h beside this file) against the CPU's greedy rule
// (sma::sample_token at temperature 0: the first index of the largest value): vocabularies smaller than, equal to
// and larger than the CTA, all-negative rows, ties within one thread's slice and across threads, and the report of
// non-finite logits (the earliest step, then the smallest stream).
// Build and run from the repository root (seconds):
//   g++ -std=c++20 -O1 -I tests/cuda/emulation -I cuda tests/cuda/emulation/emulate_argmax.cpp -pthread \
//       -o /tmp/emulate_argmax && /tmp/emulate_argmax
#include <cuda_runtime.h>

#include <cmath>
using std::isfinite;
#define __restrict__
#include <model/argmax_kernel.cuh>

#include <climits>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

namespace lm = sma::cuda::lm;

static int host_argmax(const float* v, int V) {
  int best = 0;
  for (int i = 1; i < V; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

static int failures = 0;

static void expect(bool ok, const char* what, int V, int b) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (V %d, stream %d)\n", what, V, b);
  }
}

int main() {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int B = 4, n_steps = 3;
  for (const int V : {1, 7, 37, 255, 256, 257, 1000, 5003}) {
    for (int variant = 0; variant < 4; ++variant) {
      std::vector<float> logits(static_cast<std::size_t>(B) * V);
      for (float& v : logits) v = nd(rng) - (variant == 1 ? 100.f : 0.f);  // variant 1: every value negative
      for (int b = 0; b < B; ++b) {
        float* row = logits.data() + static_cast<std::size_t>(b) * V;
        if (variant == 2 && V > 3) {  // ties across threads: the same maximum at 3 places
          const int i0 = static_cast<int>(rng() % V), i1 = static_cast<int>(rng() % V), i2 = V - 1;
          row[i0] = row[i1] = row[i2] = 50.f;
        }
        if (variant == 3 && V > 2 * lm::kArgmaxThreads) {  // a tie inside one thread's slice
          row[3 + lm::kArgmaxThreads] = row[3 + 2 * lm::kArgmaxThreads] = 60.f;
          row[V - 1] = 60.f;
        }
      }
      std::vector<int> next(B, -1), out(static_cast<std::size_t>(B) * n_steps, -1);
      int bad = INT_MAX;
      const int step = 1;
      emu::launch(dim3(B), [&] {
        lm::argmax_kernel(B, V, n_steps, step, logits.data(), next.data(), out.data(), &bad);
      });
      for (int b = 0; b < B; ++b) {
        const int want = host_argmax(logits.data() + static_cast<std::size_t>(b) * V, V);
        expect(next[b] == want, "next token", V, b);
        expect(out[static_cast<std::size_t>(b) * n_steps + step] == want, "generated token", V, b);
        expect(out[static_cast<std::size_t>(b) * n_steps] == -1, "other steps untouched", V, b);
      }
      expect(bad == INT_MAX, "no non-finite report", V, -1);
    }
    // non-finite logits: NaN in stream 2, +inf in stream 1 (step 2): the report is step * B + the smallest stream
    std::vector<float> logits(static_cast<std::size_t>(B) * V, 0.5f);
    logits[static_cast<std::size_t>(2) * V + V / 2] = std::numeric_limits<float>::quiet_NaN();
    logits[static_cast<std::size_t>(1) * V + V - 1] = std::numeric_limits<float>::infinity();
    std::vector<int> next(B, -1), out(static_cast<std::size_t>(B) * n_steps, -1);
    int bad = INT_MAX;
    emu::launch(dim3(B), [&] { lm::argmax_kernel(B, V, n_steps, 2, logits.data(), next.data(), out.data(), &bad); });
    expect(bad == 2 * B + 1, "non-finite report", V, 1);
    expect(next[0] == 0 && next[3] == 0, "finite rows still decoded", V, 0);
  }
  if (failures)
    std::printf("%d FAILURES\n", failures);
  else
    std::printf("all argmax checks passed\n");
  return failures ? 1 : 0;
}
