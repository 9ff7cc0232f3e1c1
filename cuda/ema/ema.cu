// The damped multi-head EMA on the device by a chunked scan (include/sma/cuda/ema.hpp; maths: docs/maths/ema.md).
// Two sets of segment kernels share the coefficient, carry and reduction kernels:
// - the register-tile path (K = L, the common case; tile_* below): one thread holds one (batch row, channel,
//   segment) of C steps in registers;
// - the generic path (truncation K < L, or very long rows): x = channel d (coalesced loads of (B, L, D) rows),
//   y = segment, z = batch row; orders in groups of G with their states in registers, the group loop re-reading
//   the segment (from L1/L2), which keeps any N working with a fixed register budget.
#include <sma/cuda/ema.hpp>

#include <sma/core/error.hpp>

#include "../common/check.cuh"
#include "../common/workspace.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace sma::cuda {
namespace {

/// Sizes shared by every kernel. nseg = ceil(L / C).
struct Geometry {
  int B, L, D, N, R, K, C, nseg;
  bool bidir;
};

/// Coefficients, each (N, R) order-major so that a warp's loads over channels are contiguous.
struct Coefs {
  float *q, *b, *c, *bqK, *cqK, *qK, *dK, *qC, *dC, *w;
};
constexpr int kCoefFields = 10;

Coefs coef_view(float* base, long long rn) {
  return {base,          base + rn,     base + 2 * rn, base + 3 * rn, base + 4 * rn,
          base + 5 * rn, base + 6 * rn, base + 7 * rn, base + 8 * rn, base + 9 * rn};
}

__device__ inline double sigmoid_d(double v) { return 1.0 / (1.0 + exp(-v)); }

// One thread per (r, n): the coefficients in double, stored in float.
__global__ void coef_kernel(Geometry g, EmaParams prm, Coefs cf) {
  const long long rn = static_cast<long long>(g.R) * g.N;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < rn;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / g.N), n = static_cast<int>(i % g.N);  // parameter index i = r*N + n
    const double p = sigmoid_d(prm.delta[i]), a = sigmoid_d(prm.alpha[i]);
    const double q = 1.0 - p * a, b = p * prm.beta[i], c = prm.gamma[i] / sqrt(static_cast<double>(g.N));
    const double qK = pow(q, static_cast<double>(g.K));
    const double dK = g.K * pow(q, static_cast<double>(g.K - 1));
    const double qC = pow(q, static_cast<double>(g.C));
    const double dC = g.C * pow(q, static_cast<double>(g.C - 1));
    const long long o = static_cast<long long>(n) * g.R + r;
    cf.q[o] = static_cast<float>(q);
    cf.b[o] = static_cast<float>(b);
    cf.c[o] = static_cast<float>(c);
    cf.bqK[o] = static_cast<float>(b * qK);
    cf.cqK[o] = static_cast<float>(c * qK);
    cf.qK[o] = static_cast<float>(qK);
    cf.dK[o] = static_cast<float>(dK);
    cf.qC[o] = static_cast<float>(qC);
    cf.dC[o] = static_cast<float>(dC);
    cf.w[o] = static_cast<float>(b * c);
  }
}

/// Per-thread view of one (b, d, segment): the sequence and the segment bounds.
struct Seq {
  Geometry g;
  int b, d, t0, t1;
  __device__ long long idx(int t) const { return (static_cast<long long>(b) * g.L + t) * g.D + d; }
  __device__ bool padded(const std::uint8_t* pad, int t) const {
    return pad != nullptr && pad[static_cast<long long>(b) * g.L + t] != 0;
  }
  /// Masked input value at t.
  __device__ float xm(const float* x, const std::uint8_t* pad, int t) const {
    return padded(pad, t) ? 0.f : x[idx(t)];
  }
  /// The time of step i in direction dir, and whether the input K steps back (in that direction) exists.
  __device__ int time(int i, int dir) const { return dir > 0 ? t0 + i : t1 - 1 - i; }
  __device__ bool drops(int t, int dir) const { return (dir > 0 ? t : g.L - 1 - t) >= g.K; }
  __device__ long long carry_idx(int seg, int n, int r) const {
    return ((static_cast<long long>(b) * g.nseg + seg) * g.N + n) * g.R + r;
  }
  // An order group n0 .. n0+G-1 in registers; orders past N read as 0 and are never stored, so the group loop needs
  // no tail case. One loop over the group loads every array (coefficients by order, carries by segment too): with
  // one loop per array, nvcc 13 gave the G=16 backward apply kernel 255 registers and spills; this way it uses 197.
  template <int G, class... From>
  __device__ __forceinline__ void load_group(int n0, int r, From... from) const {
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const bool in = n0 + j < g.N;
      const long long o = static_cast<long long>(n0 + j) * g.R + r, c = carry_idx(blockIdx.y, n0 + j, r);
      ((from.dst[j] = in ? from.at(o, c) : 0.f), ...);
    }
  }
  template <int G>
  __device__ __forceinline__ void store_carry(const float (&src)[G], float* buf, int n0, int r) const {
#pragma unroll
    for (int j = 0; j < G; ++j)
      if (n0 + j < g.N) buf[carry_idx(blockIdx.y, n0 + j, r)] = src[j];
  }
};

/// Sources for Seq::load_group: a coefficient (N, R), a per-segment carry buffer, or zeros.
template <int G>
struct Coef {
  float (&dst)[G];
  const float* src;
  __device__ float at(long long o, long long) const { return src[o]; }
};
template <int G>
struct Carry {
  float (&dst)[G];
  const float* src;
  __device__ float at(long long, long long c) const { return src[c]; }
};
template <int G>
struct Zero {
  float (&dst)[G];
  __device__ float at(long long, long long) const { return 0.f; }
};

__device__ inline Seq make_seq(const Geometry& g, bool& ok) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  const int seg = blockIdx.y, b = blockIdx.z;
  ok = d < g.D;
  const int t0 = seg * g.C;
  return Seq{g, b, d, t0, min(g.L, t0 + g.C)};
}

// Forward, pass 1: each segment's end state from a zero start, per kernel row and order.
template <int G>
__global__ void fwd_local_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* pad,
                                 float* __restrict__ carry) {
  bool ok;
  const Seq sq = make_seq(g, ok);
  if (!ok) return;
  const int steps = sq.t1 - sq.t0;
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + sq.d, dir = h ? -1 : 1;
    for (int n0 = 0; n0 < g.N; n0 += G) {
      float q[G], b[G], dr[G], s[G];
      sq.load_group<G>(n0, r, Coef<G>{q, cf.q}, Coef<G>{b, cf.b}, Coef<G>{dr, cf.bqK}, Zero<G>{s});
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, dir);
        const float xv = sq.xm(x, pad, t);
        const float xo = sq.drops(t, dir) ? sq.xm(x, pad, t - dir * g.K) : 0.f;
#pragma unroll
        for (int j = 0; j < G; ++j) s[j] = fmaf(q[j], s[j], fmaf(b[j], xv, -dr[j] * xo));
      }
      sq.store_carry(s, carry, n0, r);
    }
  }
}

// Pass 2: turns per-segment local end states into each segment's start state, walking the segments in the scan's
// direction: S_k = q^C S_{k-1} + local_k. With `u` also the q-derivative pair (v, u). `flip` reverses the
// direction (the adjoint). One thread per (b, n, r), r fastest.
template <int kAhead, bool kU>
__global__ void carry_kernel(Geometry g, Coefs cf, float* __restrict__ s_buf, float* __restrict__ u_buf, int flip) {
  const long long total = static_cast<long long>(g.B) * g.N * g.R;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i % g.R);
    const long long bn = i / g.R;
    const int n = static_cast<int>(bn % g.N), b = static_cast<int>(bn / g.N);
    int dir = r < g.D ? 1 : -1;
    if (flip) dir = -dir;
    const long long o = static_cast<long long>(n) * g.R + r;
    const float qC = cf.qC[o], dC = cf.dC[o];
    float S = 0.f, U = 0.f;
    const long long stride = static_cast<long long>(g.N) * g.R;  // between consecutive segments
    const long long base = static_cast<long long>(b) * g.nseg * stride + static_cast<long long>(n) * g.R + r;
    const long long step = dir * stride;  // from one segment to the next in the scan's direction
    // Blocks of kAhead segments: their loads are issued before the dependent chain (the stores would otherwise
    // keep the compiler from hoisting the next loads). The chain is latency-bound, so more loads in flight per
    // thread is what makes it faster (ncu, H200: 8 ahead ran at 19% of DRAM bandwidth).
    for (int k0 = 0; k0 < g.nseg; k0 += kAhead) {
      const long long first = base + (dir > 0 ? k0 : g.nseg - 1 - k0) * stride;
      float* ps = s_buf + first;
      float* pu = kU ? u_buf + first : nullptr;
      const int m = min(kAhead, g.nseg - k0);
      float ls[kAhead], lu[kU ? kAhead : 1];
#pragma unroll
      for (int j = 0; j < kAhead; ++j) {
        ls[j] = j < m ? ps[j * step] : 0.f;
        if constexpr (kU) lu[j] = j < m ? pu[j * step] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kAhead; ++j) {
        if (j >= m) break;
        ps[j * step] = S;
        if constexpr (kU) {
          pu[j * step] = U;
          U = fmaf(qC, U, fmaf(dC, S, lu[j]));
        }
        S = fmaf(qC, S, ls[j]);
      }
    }
  }
}

// Forward, pass 3: each segment from its carried start state; out = sum over halves and orders + omega x.
template <int G>
__global__ void fwd_apply_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* pad,
                                 const float* __restrict__ carry, const float* __restrict__ omega, float* out) {
  bool ok;
  const Seq sq = make_seq(g, ok);
  if (!ok) return;
  const int steps = sq.t1 - sq.t0;
  const float om = omega[sq.d];
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + sq.d, dir = h ? -1 : 1;
    for (int n0 = 0; n0 < g.N; n0 += G) {
      const bool first = h == 0 && n0 == 0;
      float q[G], b[G], c[G], dr[G], s[G];
      sq.load_group<G>(n0, r, Coef<G>{q, cf.q}, Coef<G>{b, cf.b}, Coef<G>{c, cf.c}, Coef<G>{dr, cf.bqK},
                       Carry<G>{s, carry});
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, dir);
        const bool pd = sq.padded(pad, t);
        const float xr = x[sq.idx(t)];
        const float xv = pd ? 0.f : xr;
        const float xo = sq.drops(t, dir) ? sq.xm(x, pad, t - dir * g.K) : 0.f;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < G; ++j) {
          s[j] = fmaf(q[j], s[j], fmaf(b[j], xv, -dr[j] * xo));
          acc = fmaf(c[j], s[j], acc);
        }
        if (first)
          out[sq.idx(t)] = fmaf(om, xr, acc);
        else
          out[sq.idx(t)] += acc;
      }
    }
  }
}

// Backward, pass 1: local end states of (v, u) in the forward direction and of the adjoint g in the reverse one.
template <int G>
__global__ void bwd_local_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* pad,
                                 const float* __restrict__ dy, float* __restrict__ cv, float* __restrict__ cu,
                                 float* __restrict__ cg) {
  bool ok;
  const Seq sq = make_seq(g, ok);
  if (!ok) return;
  const int steps = sq.t1 - sq.t0;
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + sq.d, dir = h ? -1 : 1;
    for (int n0 = 0; n0 < g.N; n0 += G) {
      float q[G], qK[G], dK[G], v[G], u[G];
      sq.load_group<G>(n0, r, Coef<G>{q, cf.q}, Coef<G>{qK, cf.qK}, Coef<G>{dK, cf.dK}, Zero<G>{v}, Zero<G>{u});
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, dir);
        const float xv = sq.xm(x, pad, t);
        const float xo = sq.drops(t, dir) ? sq.xm(x, pad, t - dir * g.K) : 0.f;
#pragma unroll
        for (int j = 0; j < G; ++j) {
          u[j] = fmaf(q[j], u[j], fmaf(-dK[j], xo, v[j]));
          v[j] = fmaf(q[j], v[j], fmaf(-qK[j], xo, xv));
        }
      }
      sq.store_carry(v, cv, n0, r);
      sq.store_carry(u, cu, n0, r);
      // The adjoint: g[t] = q g[t+dir] + c G[t] - c q^K G[t+dir K], run against the direction.
      float c[G], cd[G], s[G];
      sq.load_group<G>(n0, r, Coef<G>{c, cf.c}, Coef<G>{cd, cf.cqK}, Zero<G>{s});
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, -dir);
        const float gv = dy[sq.idx(t)];
        const float go = sq.drops(t, -dir) ? dy[sq.idx(t + dir * g.K)] : 0.f;
#pragma unroll
        for (int j = 0; j < G; ++j) s[j] = fmaf(q[j], s[j], fmaf(c[j], gv, -cd[j] * go));
      }
      sq.store_carry(s, cg, n0, r);
    }
  }
}

// Backward, pass 3: from the carried states, the per-segment partials of sum G v and sum G u (written over cv and
// cu, which only this thread reads), dx, and the per-segment partial of d omega.
template <int G>
__global__ void bwd_apply_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* pad,
                                 const float* __restrict__ dy, const float* __restrict__ omega, float* cv, float* cu,
                                 const float* __restrict__ cg, float* dx, const float* __restrict__ residual,
                                 float* __restrict__ domega_part) {
  bool ok;
  const Seq sq = make_seq(g, ok);
  if (!ok) return;
  const int steps = sq.t1 - sq.t0;
  const float om = omega[sq.d];
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + sq.d, dir = h ? -1 : 1;
    for (int n0 = 0; n0 < g.N; n0 += G) {
      const bool first = h == 0 && n0 == 0;
      float q[G], qK[G], dK[G], v[G], u[G], gw[G], gq[G];
      sq.load_group<G>(n0, r, Coef<G>{q, cf.q}, Coef<G>{qK, cf.qK}, Coef<G>{dK, cf.dK}, Carry<G>{v, cv},
                       Carry<G>{u, cu}, Zero<G>{gw}, Zero<G>{gq});
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, dir);
        const float xv = sq.xm(x, pad, t);
        const float xo = sq.drops(t, dir) ? sq.xm(x, pad, t - dir * g.K) : 0.f;
        const float gv = dy[sq.idx(t)];
#pragma unroll
        for (int j = 0; j < G; ++j) {
          u[j] = fmaf(q[j], u[j], fmaf(-dK[j], xo, v[j]));
          v[j] = fmaf(q[j], v[j], fmaf(-qK[j], xo, xv));
          gw[j] = fmaf(gv, v[j], gw[j]);
          gq[j] = fmaf(gv, u[j], gq[j]);
        }
      }
      sq.store_carry(gw, cv, n0, r);
      sq.store_carry(gq, cu, n0, r);
      float b[G], c[G], cd[G], s[G];
      sq.load_group<G>(n0, r, Coef<G>{b, cf.b}, Coef<G>{c, cf.c}, Coef<G>{cd, cf.cqK}, Carry<G>{s, cg});
      float dom = 0.f;
      for (int i = 0; i < steps; ++i) {
        const int t = sq.time(i, -dir);
        const float gv = dy[sq.idx(t)];
        const float go = sq.drops(t, -dir) ? dy[sq.idx(t + dir * g.K)] : 0.f;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < G; ++j) {
          s[j] = fmaf(q[j], s[j], fmaf(c[j], gv, -cd[j] * go));
          acc = fmaf(b[j], s[j], acc);
        }
        const bool pd = sq.padded(pad, t);
        if (first) {
          dx[sq.idx(t)] = fmaf(om, gv, pd ? 0.f : acc) + (residual ? residual[sq.idx(t)] : 0.f);
          dom = fmaf(gv, x[sq.idx(t)], dom);
        } else if (!pd) {
          dx[sq.idx(t)] += acc;
        }
      }
      if (first) domega_part[(static_cast<long long>(sq.b) * g.nseg + blockIdx.y) * g.D + sq.d] = dom;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The register-tile path, for K = L (no truncation). One thread holds its whole segment (C steps of one channel)
// in registers, so x and dy are read once per pass, both directions of a bidirectional EMA run from that one read,
// and each output element is written once. Orders are the outer loop, two at a time (two independent chains per
// step), so any N needs no register group. States are kept in units of x (v = s / b, y = sum_n w v, w = b c):
// one FMA per order and step for the state. Block: 32 channels (x) by kSegsPerBlock segments (y), grid z = batch
// row. The carries (B, nseg, N, R) and the carry pass are those of the generic path.
constexpr int kSegsPerBlock = 4;
constexpr int kPair = 2;  // orders per pass over the segment

template <int C>
struct Tile {
  int b, d, seg, t0, steps;
  __device__ long long at(const Geometry& g, int i) const {
    return (static_cast<long long>(b) * g.L + t0 + i) * g.D + d;
  }
  __device__ long long carry(const Geometry& g, int n, int r) const {
    return ((static_cast<long long>(b) * g.nseg + seg) * g.N + n) * g.R + r;
  }
  /// Reads C values of a (B, L, D) array, 0 past the end of the row.
  __device__ void load(const Geometry& g, const float* __restrict__ a, float (&v)[C]) const {
#pragma unroll
    for (int i = 0; i < C; ++i) v[i] = i < steps ? __ldg(a + at(g, i)) : 0.f;
  }
  /// Bit i set where step i is padded.
  __device__ unsigned long long pad_bits(const Geometry& g, const std::uint8_t* pad) const {
    unsigned long long m = 0;
    if (pad == nullptr) return m;
    const std::uint8_t* p = pad + static_cast<long long>(b) * g.L + t0;
#pragma unroll
    for (int i = 0; i < C; ++i)
      if (i < steps && __ldg(p + i) != 0) m |= 1ULL << i;
    return m;
  }
};

template <int C>
__device__ inline bool make_tile(const Geometry& g, Tile<C>& tl) {
  tl.d = blockIdx.x * 32 + threadIdx.x;
  tl.seg = blockIdx.y * kSegsPerBlock + threadIdx.y;
  tl.b = blockIdx.z;
  tl.t0 = tl.seg * C;
  tl.steps = min(C, g.L - tl.t0);
  return tl.d < g.D && tl.seg < g.nseg;
}

/// Coefficient `f` and carry of orders n0, n0+1 for kernel row r; a missing second order reads q = w = carry = 0.
struct PairCoefs {
  float q[kPair], w[kPair];
};
__device__ inline PairCoefs pair_coefs(const Geometry& g, const Coefs& cf, int n0, int r) {
  PairCoefs pc;
#pragma unroll
  for (int p = 0; p < kPair; ++p) {
    const bool in = n0 + p < g.N;
    const long long o = static_cast<long long>(n0 + p) * g.R + r;
    pc.q[p] = in ? cf.q[o] : 0.f;
    pc.w[p] = in ? cf.w[o] : 0.f;
  }
  return pc;
}

/// Pair k of the flat (half, order pair) loop of the forward apply: coefficients and carried start states, a
/// missing second order reading 0.
struct PairLoad {
  PairCoefs c;
  float v[kPair];
};
template <int C>
__device__ __forceinline__ PairLoad pair_load(const Geometry& g, const Coefs& cf, const Tile<C>& tl,
                                              const float* carry, int k, int pairs) {
  const int h = k / pairs, n0 = (k - h * pairs) * kPair, r = h * g.D + tl.d;
  PairLoad pl{pair_coefs(g, cf, n0, r), {}};
#pragma unroll
  for (int p = 0; p < kPair; ++p) pl.v[p] = n0 + p < g.N ? carry[tl.carry(g, n0 + p, r)] : 0.f;
  return pl;
}

/// One order's coefficients and carried states (lambda, mu) for the backward apply; order k of the flat (half,
/// order) loop, k = h N + n.
struct OrderLoad {
  float q, w, l0, m0;
};
template <int C>
__device__ __forceinline__ OrderLoad order_load(const Geometry& g, const Coefs& cf, const Tile<C>& tl,
                                                const float* cl, const float* cm, int k) {
  const int h = k / g.N, n = k - h * g.N, r = h * g.D + tl.d;
  const long long o = static_cast<long long>(n) * g.R + r, at = tl.carry(g, n, r);
  return OrderLoad{cf.q[o], cf.w[o], cl[at], cm[at]};
}

// Forward pass 1: each segment's end state from a zero start, v = sum_i q^(C-1-i) xm[i] in the row's direction.
template <int C>
__global__ void __launch_bounds__(32 * kSegsPerBlock)
    tile_fwd_local_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* __restrict__ pad,
                          float* __restrict__ carry) {
  Tile<C> tl;
  if (!make_tile(g, tl)) return;
  float xm[C];
  tl.load(g, x, xm);
  const unsigned long long pm = tl.pad_bits(g, pad);
#pragma unroll
  for (int i = 0; i < C; ++i)
    if ((pm >> i) & 1ULL) xm[i] = 0.f;
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + tl.d;
    for (int n0 = 0; n0 < g.N; n0 += kPair) {
      const PairCoefs pc = pair_coefs(g, cf, n0, r);
      float v[kPair] = {};
      if (h == 0) {
#pragma unroll
        for (int i = 0; i < C; ++i)
#pragma unroll
          for (int p = 0; p < kPair; ++p) v[p] = fmaf(pc.q[p], v[p], xm[i]);
      } else {
#pragma unroll
        for (int i = C - 1; i >= 0; --i)
#pragma unroll
          for (int p = 0; p < kPair; ++p) v[p] = fmaf(pc.q[p], v[p], xm[i]);
      }
#pragma unroll
      for (int p = 0; p < kPair; ++p)
        if (n0 + p < g.N) carry[tl.carry(g, n0 + p, r)] = v[p];
    }
  }
}

// Forward pass 3: out = omega x + sum over halves and orders of w v, from each segment's carried start state.
template <int C>
__global__ void __launch_bounds__(32 * kSegsPerBlock)
    tile_fwd_apply_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* __restrict__ pad,
                          const float* __restrict__ carry, const float* __restrict__ omega, float* __restrict__ out) {
  Tile<C> tl;
  if (!make_tile(g, tl)) return;
  float xm[C], acc[C];
  tl.load(g, x, xm);
  const unsigned long long pm = tl.pad_bits(g, pad);
  const float om = omega[tl.d];
#pragma unroll
  for (int i = 0; i < C; ++i) {
    acc[i] = om * xm[i];  // omega multiplies the unmasked input
    if ((pm >> i) & 1ULL) xm[i] = 0.f;
  }
  // Order pairs of both halves in one flat loop; the next pair's coefficients and carries are loaded ahead.
  const int pairs = (g.N + kPair - 1) / kPair, steps = (g.bidir ? 2 : 1) * pairs;
  PairLoad next = pair_load(g, cf, tl, carry, 0, pairs);
  for (int k = 0; k < steps; ++k) {
    const PairLoad pl = next;
    if (k + 1 < steps) next = pair_load(g, cf, tl, carry, k + 1, pairs);
    float v[kPair] = {pl.v[0], pl.v[1]};
    const PairCoefs& pc = pl.c;
    if (k < pairs) {
#pragma unroll
      for (int i = 0; i < C; ++i)
#pragma unroll
        for (int p = 0; p < kPair; ++p) {
          v[p] = fmaf(pc.q[p], v[p], xm[i]);
          acc[i] = fmaf(pc.w[p], v[p], acc[i]);
        }
    } else {
#pragma unroll
      for (int i = C - 1; i >= 0; --i)
#pragma unroll
        for (int p = 0; p < kPair; ++p) {
          v[p] = fmaf(pc.q[p], v[p], xm[i]);
          acc[i] = fmaf(pc.w[p], v[p], acc[i]);
        }
    }
  }
#pragma unroll
  for (int i = 0; i < C; ++i)
    if (i < tl.steps) out[tl.at(g, i)] = acc[i];
}

// The backward runs the adjoint only. With lambda[t] = G[t] + q lambda[t + dir] and mu[t] = lambda[t + dir] + q
// mu[t + dir] (both against the row's direction), the two parameter sums need no forward state:
//   sum_t G[t] v[t] = sum_t xm[t] lambda[t]   and   sum_t lambda[t] v[t - dir] = sum_t xm[t] mu[t]
// (exchange the order of the double sums). Over a segment of C steps (lambda, mu) maps by [[q^C, 0], [C q^(C-1),
// q^C]], the generic path's (v, u) carry (carry_kernel with kU). So the v chain, its carry pass and the per-step
// v array of the apply kernel (32 registers at C = 32) go (docs/cuda.md, "The register-tile path").

// Backward pass 1: the local end states of lambda and mu of each segment, from zero, against the row's direction.
template <int C>
__global__ void __launch_bounds__(32 * kSegsPerBlock)
    tile_bwd_local_kernel(Geometry g, Coefs cf, const float* __restrict__ dy, float* __restrict__ cl,
                          float* __restrict__ cm) {
  Tile<C> tl;
  if (!make_tile(g, tl)) return;
  float gy[C];
  tl.load(g, dy, gy);
  for (int h = 0; h < (g.bidir ? 2 : 1); ++h) {
    const int r = h * g.D + tl.d;
    for (int n0 = 0; n0 < g.N; n0 += kPair) {
      const PairCoefs pc = pair_coefs(g, cf, n0, r);
      float l[kPair] = {}, m[kPair] = {};
      const auto step = [&](float gv) {
#pragma unroll
        for (int p = 0; p < kPair; ++p) {
          m[p] = fmaf(pc.q[p], m[p], l[p]);
          l[p] = fmaf(pc.q[p], l[p], gv);
        }
      };
      if (h == 0) {  // two loops, so that every register index is a constant
#pragma unroll
        for (int i = C - 1; i >= 0; --i) step(gy[i]);
      } else {
#pragma unroll
        for (int i = 0; i < C; ++i) step(gy[i]);
      }
#pragma unroll
      for (int p = 0; p < kPair; ++p)
        if (n0 + p < g.N) {
          cl[tl.carry(g, n0 + p, r)] = l[p];
          cm[tl.carry(g, n0 + p, r)] = m[p];
        }
    }
  }
}

// Backward pass 3. Per order, from the carried (lambda, mu), one pass against the direction: dx += w lambda,
// dw += xm lambda, dq += xm mu. The per-segment sums of xm lambda and xm mu go to shared memory, and the block adds
// its kSegsPerBlock segments' sums in a fixed order into one partial per (batch row, segment block, order, kernel
// row) in pw / pq: a quarter of the per-segment partials' traffic (written here, read by param_grad_kernel). The
// omega partial sum G x per segment as before. Dynamic shared memory: tile_apply_smem(g) bytes.
// Four blocks per SM (at most 128 registers at C = 32, with 72 bytes of spills) rather than the compiler's three
// at 154 registers: 225 against 271 us per launch at the training step's shape (H200, ncu), since the kernel is
// bound by the latency of its chains and more warps hide it.
template <int C>
__global__ void __launch_bounds__(32 * kSegsPerBlock, 4)
    tile_bwd_apply_kernel(Geometry g, Coefs cf, const float* __restrict__ x, const std::uint8_t* __restrict__ pad,
                          const float* __restrict__ dy, const float* __restrict__ omega, const float* cl,
                          const float* cm, float* __restrict__ dx, const float* __restrict__ residual,
                          float* __restrict__ domega_part, float* __restrict__ pw, float* __restrict__ pq) {
  extern __shared__ float seg_sums[];  // [2][orders][kSegsPerBlock][32]: sums of xm lambda, then of xm mu
  const int orders = (g.bidir ? 2 : 1) * g.N;
  const auto slot = [&](int which, int k, int y) {
    return ((which * orders + k) * kSegsPerBlock + y) * 32 + static_cast<int>(threadIdx.x);
  };
  Tile<C> tl;
  if (make_tile(g, tl)) {
    float xm[C], gy[C], acc[C];
    tl.load(g, x, xm);
    tl.load(g, dy, gy);
    const unsigned long long pm = tl.pad_bits(g, pad);
    float dom = 0.f;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      dom = fmaf(gy[i], xm[i], dom);  // d omega: the unmasked input
      if ((pm >> i) & 1ULL) xm[i] = 0.f;
      acc[i] = 0.f;
    }
    // One (half, order) after another; the next one's coefficients and carried states are loaded before this
    // one's chains run, so their latency hides behind the chains (few warps fit beside this kernel's registers).
    OrderLoad next = order_load(g, cf, tl, cl, cm, 0);
    for (int k = 0; k < orders; ++k) {
      const OrderLoad cur = next;
      if (k + 1 < orders) next = order_load(g, cf, tl, cl, cm, k + 1);
      const float q = cur.q, w = cur.w;
      float l = cur.l0, m = cur.m0, gw = 0.f, gq = 0.f;
      const auto step = [&](int i) {
        m = fmaf(q, m, l);
        l = fmaf(q, l, gy[i]);
        acc[i] = fmaf(w, l, acc[i]);
        gw = fmaf(xm[i], l, gw);
        gq = fmaf(xm[i], m, gq);
      };
      if (k < g.N) {  // against the direction; two loops, so that every register index is a constant
#pragma unroll
        for (int i = C - 1; i >= 0; --i) step(i);
      } else {
#pragma unroll
        for (int i = 0; i < C; ++i) step(i);
      }
      seg_sums[slot(0, k, threadIdx.y)] = gw;
      seg_sums[slot(1, k, threadIdx.y)] = gq;
    }
    const float om = omega[tl.d];
#pragma unroll
    for (int i = 0; i < C; ++i)
      if (i < tl.steps) {
        const long long at = tl.at(g, i);
        dx[at] = fmaf(om, gy[i], ((pm >> i) & 1ULL) ? 0.f : acc[i]) + (residual ? residual[at] : 0.f);
      }
    domega_part[(static_cast<long long>(tl.b) * g.nseg + tl.seg) * g.D + tl.d] = dom;
  } else {
    for (int k = 0; k < orders; ++k) seg_sums[slot(0, k, threadIdx.y)] = seg_sums[slot(1, k, threadIdx.y)] = 0.f;
  }
  __syncthreads();
  const int d = blockIdx.x * 32 + threadIdx.x;
  if (d >= g.D) return;
  for (int k = threadIdx.y; k < orders; k += kSegsPerBlock) {
    float sw = 0.f, sq = 0.f;
#pragma unroll
    for (int y = 0; y < kSegsPerBlock; ++y) {
      sw += seg_sums[slot(0, k, y)];
      sq += seg_sums[slot(1, k, y)];
    }
    const int h = k / g.N, n = k - h * g.N, r = h * g.D + d;
    const long long at = ((static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y) * g.N + n) * g.R + r;
    pw[at] = sw;
    pq[at] = sq;
  }
}

// Deterministic column sums of per-segment partials: `parts` rows of `cols` floats, summed in double. A block
// takes 32 columns; its kReduceRows thread rows take the rows k = y, y + kReduceRows, ... in order, and row 0 adds
// the kReduceRows sums in order, so the result never depends on scheduling.
constexpr int kReduceRows = 32;

__device__ inline bool column_sum(const float* __restrict__ part, long long parts, long long cols, double (*sh)[32],
                                  long long& col, double& sum) {
  col = static_cast<long long>(blockIdx.x) * 32 + threadIdx.x;
  double s = 0;
  if (col < cols)
#pragma unroll 4
    for (long long k = threadIdx.y; k < parts; k += kReduceRows) s += part[k * cols + col];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return false;
  sum = 0;
  for (int j = 0; j < kReduceRows; ++j) sum += sh[j][threadIdx.x];
  return true;
}

// Per (n, r) column (order-major, as the partials): sums the segment partials of dw and of sum lambda v_prev (or,
// on the generic path, sum G u) and applies the chain rule from (w, q) to the parameters
// (docs/maths/ema.md#parameters); gradients are ADDED.
__global__ void __launch_bounds__(32 * kReduceRows)
    param_grad_kernel(Geometry g, EmaParams prm, const float* __restrict__ gw_part,
                      const float* __restrict__ gq_part, long long parts, EmaGrads grads) {
  __shared__ double shw[kReduceRows][32], shq[kReduceRows][32];
  const long long cols = static_cast<long long>(g.R) * g.N;
  long long i;
  double sw = 0, sq = 0;
  const bool mine = column_sum(gw_part, parts, cols, shw, i, sw);
  column_sum(gq_part, parts, cols, shq, i, sq);
  if (!mine) return;
  const int n = static_cast<int>(i / g.R), r = static_cast<int>(i % g.R);
  const long long pi = static_cast<long long>(r) * g.N + n;
  const double p = sigmoid_d(prm.delta[pi]), a = sigmoid_d(prm.alpha[pi]);
  const double beta = prm.beta[pi], gamma = prm.gamma[pi], rs = 1.0 / sqrt(static_cast<double>(g.N));
  const double w = p * beta * gamma * rs;
  const double dw = sw, dq = w * sq;
  const double dp = dw * beta * gamma * rs - a * dq;
  const double da = -p * dq;
  grads.delta[pi] += static_cast<float>(dp * p * (1 - p));
  grads.alpha[pi] += static_cast<float>(da * a * (1 - a));
  grads.beta[pi] += static_cast<float>(dw * p * gamma * rs);
  grads.gamma[pi] += static_cast<float>(dw * p * beta * rs);
}

__global__ void __launch_bounds__(32 * kReduceRows)
    omega_grad_kernel(Geometry g, const float* __restrict__ part, float* domega) {
  __shared__ double sh[kReduceRows][32];
  long long d;
  double s = 0;
  if (column_sum(part, static_cast<long long>(g.B) * g.nseg, g.D, sh, d, s)) domega[d] += static_cast<float>(s);
}

constexpr long long kMaxSegments = 65535;

void check_config(const EmaConfig& c, const char* where) {
  if (c.batch < 0 || c.length < 0)
    throw ValueError(str_cat(where, ": negative batch ", c.batch, " or length ", c.length));
  if (c.dim < 1) throw ValueError(str_cat(where, ": dim (D) must be >= 1, got ", c.dim));
  if (c.order < 1) throw ValueError(str_cat(where, ": order (N) must be >= 1, got ", c.order));
  if (c.truncation < 0) throw ValueError(str_cat(where, ": truncation must be >= 0 (0 = none), got ", c.truncation));
  if (c.batch > 65535) throw ValueError(str_cat(where, ": batch ", c.batch, " > 65535 is not supported"));
  if (static_cast<long long>(c.batch) * c.length * c.dim >= (1LL << 40))
    throw ValueError(str_cat(where, ": tensor too large"));
  if (static_cast<long long>(c.length) > kMaxSegments * (1LL << 20))
    throw ValueError(str_cat(where, ": length ", c.length, " is too long for one call"));
}

void check_params(const EmaParams& p, const char* where) {
  if (!p.delta || !p.alpha || !p.beta || !p.gamma || !p.omega)
    throw ValueError(str_cat(where, ": a parameter pointer is null"));
}

/// The generic path's segment length: enough threads to fill the card (about 2^18 (batch row, channel, segment)
/// triples), short segments otherwise; longer segments shrink the carry buffers (B ceil(L/C) R N floats). The
/// segment index is the grid's y dimension, so at most 65535 segments (longer segments for very long rows).
int generic_segment_length(const EmaConfig& c) {
  const long long rows = static_cast<long long>(std::max(c.batch, 1)) * std::max(c.dim, 1);
  const auto nseg = [&](int C) { return (static_cast<long long>(c.length) + C - 1) / C; };
  int C = 32;
  while (C < (1 << 20) && (nseg(C) > kMaxSegments || (C < 4096 && rows * nseg(C) > (1LL << 18)))) C *= 2;
  return C;
}

/// The register-tile path's segment length, or 0 where that path does not apply (truncation K < L, or more than
/// 65535 segments). 64 for a bidirectional forward, else 32 (H200, 2026-12-03: 64 took the bidirectional forward
/// at B 16 x L 4096 x D 512 from 0.81 to 0.66 ms and left the causal one unchanged; 16 was slower everywhere);
/// SMA_CUDA_EMA_SEG=16, 32 or 64 (read on every call) overrides it, to time the trade between register pressure
/// and carry traffic. The backward caps it at 32 (it holds four C-step arrays; 64 would spill).
int tile_segment_length(const EmaConfig& c, bool backward) {
  if (c.kernel_size() < c.length) return 0;
  int C = c.bidirectional ? 64 : 32;
  if (const char* e = std::getenv("SMA_CUDA_EMA_SEG")) {
    const int v = std::atoi(e);
    if (v == 16 || v == 32 || v == 64) C = v;
  }
  if (backward) C = std::min(C, 32);
  if ((static_cast<long long>(c.length) + C - 1) / C > kMaxSegments) return 0;
  return C;
}

Geometry geometry(const EmaConfig& c, int C) {
  Geometry g{};
  g.B = c.batch;
  g.L = c.length;
  g.D = c.dim;
  g.N = c.order;
  g.R = c.rows();
  g.K = c.kernel_size();
  g.C = C;
  g.nseg = (c.length + g.C - 1) / g.C;
  g.bidir = c.bidirectional;
  return g;
}

constexpr int kThreads = 128;

/// Orders per register group in the generic backward kernels: 4 for N <= 4, else 16, or 8 with the environment
/// variable SMA_CUDA_EMA_BWD_GROUP=8 (to time the trade between occupancy and re-reading the segment).
int backward_group(int N) {
  if (N <= 4) return 4;
  static const int group = [] {
    const char* e = std::getenv("SMA_CUDA_EMA_BWD_GROUP");
    return e != nullptr && std::atoi(e) == 8 ? 8 : 16;
  }();
  return group;
}

dim3 segment_block(const Geometry& g) { return dim3(std::min(kThreads, (g.D + 31) / 32 * 32)); }
dim3 segment_grid(const Geometry& g) {
  const unsigned bx = segment_block(g).x;
  return dim3((g.D + bx - 1) / bx, g.nseg, g.B);
}
dim3 tile_block() { return dim3(32, kSegsPerBlock); }
dim3 tile_grid(const Geometry& g) { return dim3((g.D + 31) / 32, (g.nseg + kSegsPerBlock - 1) / kSegsPerBlock, g.B); }

Coefs make_coefs(const Geometry& g, const EmaParams& prm, detail::StreamWorkspace& ws, cudaStream_t s) {
  const long long rn = static_cast<long long>(g.R) * g.N;
  Coefs cf = coef_view(ws.alloc<float>(kCoefFields * rn), rn);
  coef_kernel<<<detail::grid_for(rn, 256), 256, 0, s>>>(g, prm, cf);
  SMA_CUDA_CHECK_LAUNCH();
  return cf;
}

void run_carry(const Geometry& g, const Coefs& cf, float* s_buf, float* u_buf, int flip, cudaStream_t s) {
  const long long bnr = static_cast<long long>(g.B) * g.N * g.R;
  if (u_buf != nullptr)
    carry_kernel<16, true><<<detail::grid_for(bnr, 256), 256, 0, s>>>(g, cf, s_buf, u_buf, flip);
  else
    carry_kernel<32, false><<<detail::grid_for(bnr, 256), 256, 0, s>>>(g, cf, s_buf, u_buf, flip);
  SMA_CUDA_CHECK_LAUNCH();
}

template <int C>
void tile_forward(const Geometry& g, const Coefs& cf, const EmaParams& prm, const float* x, const std::uint8_t* pad,
                  float* out, float* carry, cudaStream_t s) {
  tile_fwd_local_kernel<C><<<tile_grid(g), tile_block(), 0, s>>>(g, cf, x, pad, carry);
  SMA_CUDA_CHECK_LAUNCH();
  run_carry(g, cf, carry, nullptr, 0, s);
  tile_fwd_apply_kernel<C><<<tile_grid(g), tile_block(), 0, s>>>(g, cf, x, pad, carry, prm.omega, out);
  SMA_CUDA_CHECK_LAUNCH();
}

/// The backward apply kernel's shared memory: the per-segment dw / dq sums of a block, 2 x orders x kSegsPerBlock x
/// 32 floats.
std::size_t tile_apply_smem(const Geometry& g) {
  return static_cast<std::size_t>(2) * (g.bidir ? 2 : 1) * g.N * kSegsPerBlock * 32 * sizeof(float);
}
constexpr std::size_t kMaxApplySmem = 200 * 1024;  // beyond it (N above about 100) the generic kernels run

/// The register-tile backward; writes the dw / dq partials per segment block into pw / pq (B ceil(nseg /
/// kSegsPerBlock) N R floats each) and returns their row count.
template <int C>
long long tile_backward(const Geometry& g, const Coefs& cf, const EmaParams& prm, const float* x,
                        const std::uint8_t* pad, const float* dy, float* dx, const float* residual, float* cv,
                        float* cl, float* dom, float* pw, float* pq, cudaStream_t s) {
  tile_bwd_local_kernel<C><<<tile_grid(g), tile_block(), 0, s>>>(g, cf, dy, cl, cv);
  SMA_CUDA_CHECK_LAUNCH();
  run_carry(g, cf, cl, cv, 1, s);  // (lambda, mu) as the generic path's (v, u), against the direction
  const std::size_t smem = tile_apply_smem(g);
  if (smem > 48 * 1024)
    SMA_CUDA_CHECK(cudaFuncSetAttribute(tile_bwd_apply_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  tile_bwd_apply_kernel<C><<<tile_grid(g), tile_block(), smem, s>>>(g, cf, x, pad, dy, prm.omega, cl, cv, dx,
                                                                    residual, dom, pw, pq);
  SMA_CUDA_CHECK_LAUNCH();
  return static_cast<long long>(g.B) * tile_grid(g).y;
}

/// `parts`: the rows of the dw / dq partials (B nseg per segment; the register-tile path's B ceil(nseg /
/// kSegsPerBlock) per segment block).
void reduce_grads(const Geometry& g, const EmaParams& prm, const float* gw, const float* gq, long long parts,
                  const float* dom, const EmaGrads& grads, cudaStream_t s) {
  const long long rn = static_cast<long long>(g.R) * g.N;
  param_grad_kernel<<<static_cast<unsigned>((rn + 31) / 32), dim3(32, kReduceRows), 0, s>>>(g, prm, gw, gq, parts,
                                                                                          grads);
  SMA_CUDA_CHECK_LAUNCH();
  omega_grad_kernel<<<static_cast<unsigned>((g.D + 31) / 32), dim3(32, kReduceRows), 0, s>>>(g, dom, grads.omega);
  SMA_CUDA_CHECK_LAUNCH();
}

}  // namespace

int ema_segment_length(const EmaConfig& c) {
  const int tile = tile_segment_length(c, false);
  return tile > 0 ? tile : generic_segment_length(c);
}

void ema_forward(const EmaConfig& cfg, const EmaParams& prm, const float* x, const std::uint8_t* padding, float* out,
                 void* stream) {
  check_config(cfg, "sma::cuda::ema_forward");
  check_params(prm, "sma::cuda::ema_forward");
  if (cfg.batch == 0 || cfg.length == 0) return;
  if (!x || !out) throw ValueError("sma::cuda::ema_forward: x or out is null");
  const int tile = tile_segment_length(cfg, false);
  const Geometry g = geometry(cfg, tile > 0 ? tile : generic_segment_length(cfg));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  detail::StreamWorkspace ws(s);
  const Coefs cf = make_coefs(g, prm, ws, s);
  float* carry = ws.alloc<float>(static_cast<long long>(g.B) * g.nseg * g.N * g.R);
  if (tile == 16) return tile_forward<16>(g, cf, prm, x, padding, out, carry, s);
  if (tile == 32) return tile_forward<32>(g, cf, prm, x, padding, out, carry, s);
  if (tile == 64) return tile_forward<64>(g, cf, prm, x, padding, out, carry, s);
  const dim3 grid = segment_grid(g), block = segment_block(g);
  const bool small = g.N <= 4;
  if (small)
    fwd_local_kernel<4><<<grid, block, 0, s>>>(g, cf, x, padding, carry);
  else
    fwd_local_kernel<16><<<grid, block, 0, s>>>(g, cf, x, padding, carry);
  SMA_CUDA_CHECK_LAUNCH();
  run_carry(g, cf, carry, nullptr, 0, s);
  if (small)
    fwd_apply_kernel<4><<<grid, block, 0, s>>>(g, cf, x, padding, carry, prm.omega, out);
  else
    fwd_apply_kernel<16><<<grid, block, 0, s>>>(g, cf, x, padding, carry, prm.omega, out);
  SMA_CUDA_CHECK_LAUNCH();
}

void ema_backward(const EmaConfig& cfg, const EmaParams& prm, const float* x, const std::uint8_t* padding,
                  const float* dout, float* dx, const EmaGrads& grads, void* stream, const float* residual) {
  check_config(cfg, "sma::cuda::ema_backward");
  check_params(prm, "sma::cuda::ema_backward");
  if (!grads.delta || !grads.alpha || !grads.beta || !grads.gamma || !grads.omega)
    throw ValueError("sma::cuda::ema_backward: a gradient pointer is null");
  if (cfg.batch == 0 || cfg.length == 0) return;  // nothing to add
  if (!x || !dout || !dx) throw ValueError("sma::cuda::ema_backward: x, dout or dx is null");
  int tile = tile_segment_length(cfg, true);
  if (tile > 0 && tile_apply_smem(geometry(cfg, tile)) > kMaxApplySmem) tile = 0;
  const Geometry g = geometry(cfg, tile > 0 ? tile : generic_segment_length(cfg));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  detail::StreamWorkspace ws(s);
  const Coefs cf = make_coefs(g, prm, ws, s);
  const long long cn = static_cast<long long>(g.B) * g.nseg * g.N * g.R;
  float* cv = ws.alloc<float>(cn);
  float* cu = ws.alloc<float>(cn);
  float* dom = ws.alloc<float>(static_cast<long long>(g.B) * g.nseg * g.D);
  if (tile > 0) {
    // cl / cv: the carries of lambda and mu; pw / pq: the per-segment-block sums of xm lambda and xm mu.
    const long long pn = static_cast<long long>(g.B) * tile_grid(g).y * g.N * g.R;
    float* pw = ws.alloc<float>(pn);
    float* pq = ws.alloc<float>(pn);
    const long long parts = tile == 16
                                ? tile_backward<16>(g, cf, prm, x, padding, dout, dx, residual, cv, cu, dom, pw, pq, s)
                                : tile_backward<32>(g, cf, prm, x, padding, dout, dx, residual, cv, cu, dom, pw, pq, s);
    reduce_grads(g, prm, pw, pq, parts, dom, grads, s);
    return;
  }
  float* cg = ws.alloc<float>(cn);
  const dim3 grid = segment_grid(g), block = segment_block(g);
  const int group = backward_group(g.N);
  if (group == 4)
    bwd_local_kernel<4><<<grid, block, 0, s>>>(g, cf, x, padding, dout, cv, cu, cg);
  else if (group == 8)
    bwd_local_kernel<8><<<grid, block, 0, s>>>(g, cf, x, padding, dout, cv, cu, cg);
  else
    bwd_local_kernel<16><<<grid, block, 0, s>>>(g, cf, x, padding, dout, cv, cu, cg);
  SMA_CUDA_CHECK_LAUNCH();
  run_carry(g, cf, cv, cu, 0, s);
  run_carry(g, cf, cg, nullptr, 1, s);
  if (group == 4)
    bwd_apply_kernel<4><<<grid, block, 0, s>>>(g, cf, x, padding, dout, prm.omega, cv, cu, cg, dx, residual, dom);
  else if (group == 8)
    bwd_apply_kernel<8><<<grid, block, 0, s>>>(g, cf, x, padding, dout, prm.omega, cv, cu, cg, dx, residual, dom);
  else
    bwd_apply_kernel<16><<<grid, block, 0, s>>>(g, cf, x, padding, dout, prm.omega, cv, cu, cg, dx, residual, dom);
  SMA_CUDA_CHECK_LAUNCH();
  reduce_grads(g, prm, cv, cu, static_cast<long long>(g.B) * g.nseg, dom, grads, s);
}

}  // namespace sma::cuda
