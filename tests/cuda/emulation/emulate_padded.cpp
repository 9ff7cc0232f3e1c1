// tests/cuda/emulation/emulate_padded.cpp: runs SeqBoatLayerDevice's padded-operand passes
// (cuda/seqboat/padded_operands.cuh: gau_act_padded_kernel, mul_r_padded_kernel) on the host (cuda_runtime.h and
// cuda_bf16.h beside this file) and compares every element they write, and that they write nothing else, with a
// host composition of what the layer did before: the fp32 activation pass, then the attention's pad pass (row
// offset + s, rotary pairs with the frequency of their column and the slot's position, bf16 rounding). It checks
// the indexing (rows, column pairs, odd widths, the bound, a grid smaller than the rows); the equality of the
// device's rounding with the pad pass rests on the shared code (attn::rotate_pair_bf16_path, the same fp32
// expressions) and is checked on a GPU by the "padded attention operands" tests.
// Build and run from the repository root (a minute on 2 cores):
//   g++ -std=c++20 -O1 -I tests/cuda/emulation -I cuda -I include tests/cuda/emulation/emulate_padded.cpp -pthread \
//       -o /tmp/emulate_padded && /tmp/emulate_padded
#include <cuda_runtime.h>
// The kernels' dynamic shared table (extern __shared__) becomes a namespace-scope array: CTAs run one at a time.
#undef __shared__
#define __shared__
namespace sma::cuda {
namespace {
double gau_inv[8192];
}
}  // namespace sma::cuda
#include <seqboat/padded_operands.cuh>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace sma::cuda;

namespace {

constexpr std::uint16_t kSentinel = 0xabcd;

std::uint16_t bits(__nv_bfloat16 h) { return h.x; }

struct Case {
  int M, S, Z, H, off;
  bool rot, bound;  // bound: S on the "device" (rows = M), else rows = S and no bound
  unsigned seed;
};

int run(const Case& k) {
  std::mt19937 rng(k.seed);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  const int P = k.Z + 2 * k.H;
  const long long rows = k.off + static_cast<long long>(k.M) + k.off + 64;  // padded rows (any count >= off + M)
  std::vector<__nv_bfloat16> base(static_cast<std::size_t>(k.M) * P), dhr(static_cast<std::size_t>(k.M) * k.H);
  for (auto& b : base) b = __float2bfloat16_rn(u(rng));
  for (auto& b : dhr) b = __float2bfloat16_rn(u(rng));
  std::vector<float> bias(P), gamma(2 * k.Z), beta(2 * k.Z);
  for (float& x : bias) x = 0.3f * u(rng);
  for (float& x : gamma) x = u(rng);
  for (float& x : beta) x = 0.1f * u(rng);
  std::vector<int> pos(k.M);
  for (int s = 0, t = 0; s < k.M; ++s) pos[s] = (t += 1 + static_cast<int>(rng() % 3000));  // large angles too
  const double theta = 10000.0;
  const __nv_bfloat16 sen{kSentinel};
  std::vector<__nv_bfloat16> qp(rows * k.Z, sen), kp(rows * k.Z, sen), vp(rows * k.H, sen), dop(rows * k.H, sen);
  std::vector<float> datt(static_cast<std::size_t>(k.M) * k.H, NAN);
  const int S = k.S;
  const long long nrows = k.bound ? k.M : k.S;
  const int* bound = k.bound ? &S : nullptr;

  emu::launch(dim3(3), [&] {
    if (k.rot)
      gau_act_padded_kernel<true>(nrows, k.Z, k.H, base.data(), bias.data(), gamma.data(), beta.data(), pos.data(),
                                  theta, k.off, qp.data(), kp.data(), vp.data(), bound);
    else
      gau_act_padded_kernel<false>(nrows, k.Z, k.H, base.data(), bias.data(), gamma.data(), beta.data(), nullptr,
                                   0.0, k.off, qp.data(), kp.data(), vp.data(), bound);
  });
  emu::launch(dim3(3), [&] {
    mul_r_padded_kernel(nrows, k.Z, k.H, dhr.data(), base.data(), bias.data(), bound, datt.data(), k.off,
                        dop.data());
  });

  // The reference: the fp32 passes, then the pad pass, element by element.
  std::vector<std::uint16_t> rq(rows * k.Z, kSentinel), rk(rows * k.Z, kSentinel), rv(rows * k.H, kSentinel),
      rd(rows * k.H, kSentinel);
  std::vector<float> rdatt(static_cast<std::size_t>(k.M) * k.H, NAN);
  const auto silu = [&](int s, int c) {
    const float b = __bfloat162float(base[static_cast<std::size_t>(s) * P + c]) + bias[c];
    return b / (1.f + std::exp(-b));
  };
  for (int s = 0; s < S; ++s) {
    std::vector<float> q(k.Z), kk(k.Z);
    for (int c = 0; c < k.Z; ++c) {
      const float a = silu(s, c);
      q[c] = a * gamma[c] + beta[c];
      kk[c] = a * gamma[k.Z + c] + beta[k.Z + c];
    }
    if (k.rot)
      for (int m = 0; m < k.Z / 2; ++m) {
        const double inv = 1.0 / std::pow(theta, static_cast<double>(2 * m) / static_cast<double>(k.Z));
        attn::rotate_pair_bf16_path(q[2 * m], q[2 * m + 1], static_cast<double>(pos[s]) * inv);
        attn::rotate_pair_bf16_path(kk[2 * m], kk[2 * m + 1], static_cast<double>(pos[s]) * inv);
      }
    const long long r = k.off + s;
    for (int c = 0; c < k.Z; ++c) {
      rq[r * k.Z + c] = bits(__float2bfloat16_rn(q[c]));
      rk[r * k.Z + c] = bits(__float2bfloat16_rn(kk[c]));
    }
    for (int c = 0; c < k.H; ++c) {
      rv[r * k.H + c] = bits(__float2bfloat16_rn(silu(s, k.Z + k.H + c)));
      const float x = __bfloat162float(dhr[static_cast<std::size_t>(s) * k.H + c]) * silu(s, k.Z + c);
      rdatt[static_cast<std::size_t>(s) * k.H + c] = x;
      rd[r * k.H + c] = bits(__float2bfloat16_rn(x));
    }
  }
  int bad = 0;
  const auto cmp = [&](const char* what, const std::vector<__nv_bfloat16>& got, const std::vector<std::uint16_t>& want,
                       int w) {
    for (std::size_t i = 0; i < want.size(); ++i)
      if (got[i].x != want[i] && bad++ < 10)
        std::printf("  %s row %zu col %zu: got %04x want %04x\n", what, i / w, i % w, got[i].x, want[i]);
  };
  cmp("q", qp, rq, k.Z);
  cmp("k", kp, rk, k.Z);
  cmp("v", vp, rv, k.H);
  cmp("dout", dop, rd, k.H);
  for (std::size_t i = 0; i < datt.size(); ++i) {
    const bool same = std::isnan(rdatt[i]) ? std::isnan(datt[i]) : std::memcmp(&datt[i], &rdatt[i], 4) == 0;
    if (!same && bad++ < 10) std::printf("  datt %zu: got %g want %g\n", i, datt[i], rdatt[i]);
  }
  std::printf("M=%d S=%d Z=%d H=%d off=%d rot=%d bound=%d: %s (%d bad)\n", k.M, k.S, k.Z, k.H, k.off, k.rot,
              k.bound, bad ? "FAIL" : "ok", bad);
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  const Case cases[] = {
      {40, 29, 16, 40, 64, false, true, 1},  {40, 29, 16, 40, 64, true, true, 2},
      {17, 17, 15, 13, 64, false, true, 3},  {23, 11, 16, 21, 128, true, false, 4},
      {9, 0, 8, 6, 64, true, true, 5},       {12, 12, 2, 1, 64, true, false, 6},
      {70, 65, 128, 256, 64, true, true, 7},
  };
  int fails = 0;
  for (const Case& c : cases) fails += run(c);
  std::printf(fails ? "%d case(s) FAILED\n" : "all cases ok\n", fails);
  return fails ? 1 : 0;
}
