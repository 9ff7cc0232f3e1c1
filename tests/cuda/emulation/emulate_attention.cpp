// tests/cuda/emulation/emulate_attention.cpp: runs the local-attention kernels' device code on the host (see
// cuda_runtime.h beside this file) and compares every output and gradient with the double CPU op. It mirrors the
// launchers of cuda/local_attention/*.cu (parameters, grids; rotary and the bias gradient's sum over the dq
// kernel's dS band done on the host), with and without attention dropout (the kDropout instantiations).
// Build and run from the repository root (about 1 min on 2 cores; `./a.out 3` runs case 3 only):
//   g++ -std=c++20 -O1 -I tests/cuda/emulation -I include -I cuda -I /usr/include/eigen3 -DEIGEN_MPL2_ONLY \
//       tests/cuda/emulation/emulate_attention.cpp -pthread -o /tmp/emulate_attention && /tmp/emulate_attention
#include <cuda_runtime.h>
#include <local_attention/forward_kernel.cuh>
#include <local_attention/backward_kernel.cuh>
#include <sma/ops/local_attention.hpp>
#include <cstdio>
#include <random>

using namespace sma;
using AA = ops::AttentionActivation;
using PE = ops::PositionEncoding;
using Tr = cuda::attn::DefaultTraits;

struct Case { std::vector<Index> lengths; Index Z, H, W; Direction dir; AA act; PE pos; Index P; double valid_prob; Index extra; unsigned seed; double dropout = 0; };

static void rotate(std::vector<float>& m, Index S, Index Z, const std::vector<int>& pos, double theta, double sign) {
  for (Index s = 0; s < S; ++s)
    for (Index mm = 0; mm < Z / 2; ++mm) {
      const double inv = 1.0 / std::pow(theta, double(2 * mm) / double(Z));
      const double a = sign * pos[s] * inv, sn = std::sin(a), cs = std::cos(a);
      const double x0 = m[s * Z + 2 * mm], x1 = m[s * Z + 2 * mm + 1];
      m[s * Z + 2 * mm] = float(x0 * cs - x1 * sn);
      m[s * Z + 2 * mm + 1] = float(x0 * sn + x1 * cs);
    }
}

static double maxdiff(const float* a, const double* b, size_t n, double* scale) {
  double m = 0, s = 0;
  for (size_t i = 0; i < n; ++i) { m = std::max(m, std::abs(a[i] - b[i])); s = std::max(s, std::abs(b[i])); if (std::isnan(a[i])) m = INFINITY; }
  *scale = s;
  return m;
}

int run(const Case& c) {
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<double> u(-1, 1), u01(0, 1);
  std::uniform_int_distribution<int> gap(1, 3);
  std::vector<Index> off{0};
  for (Index l : c.lengths) off.push_back(off.back() + l);
  const Index S = off.back(), cap = S + c.extra, Z = c.Z, H = c.H;
  std::vector<std::int64_t> pos;
  for (size_t b = 0; b + 1 < off.size(); ++b) { std::int64_t t = gap(rng) - 1; for (Index s = off[b]; s < off[b + 1]; ++s, t += gap(rng)) pos.push_back(t); }
  std::vector<std::uint8_t> valid;
  for (Index s = 0; s < S; ++s) valid.push_back(u01(rng) < c.valid_prob);
  const bool use_valid = c.valid_prob < 1;
  const double qa = c.act == AA::softmax ? 1.5 : 1.5 * (c.dir == Direction::causal ? c.W : 2 * c.W) / std::sqrt(double(c.Z));
  Matrix<double> q(S, Z), k(S, Z), v(S, H), dout(S, H);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = float(qa * u(rng));
  for (Index i = 0; i < k.size(); ++i) k.data()[i] = float(u(rng));
  for (Index i = 0; i < v.size(); ++i) v.data()[i] = float(u(rng));
  for (Index i = 0; i < dout.size(); ++i) dout.data()[i] = float(u(rng));
  ops::LocalAttentionConfig cfg; cfg.window = c.W; cfg.direction = c.dir; cfg.activation = c.act; cfg.position = c.pos; cfg.max_positions = c.P;
  cfg.dropout = c.dropout; cfg.dropout_seed = 77 + c.seed;
  const Index ts = cfg.bias_table_size();
  std::vector<double> table; for (Index e = 0; e < ts; ++e) table.push_back(float(0.5 * u(rng)));
  ops::LocalAttentionInput<double> in{CMatrixMap<double>(q.data(), S, Z), CMatrixMap<double>(k.data(), S, Z), CMatrixMap<double>(v.data(), S, H), &off, &pos, use_valid ? &valid : nullptr};
  ops::LocalAttentionSaved<double> saved;
  Matrix<double> out = ops::local_attention_forward<double>(cfg, in, table.empty() ? nullptr : table.data(), &saved);
  Matrix<double> dq, dk, dv; std::vector<double> dtab(ts, 0.25);
  ops::local_attention_backward<double>(cfg, in, table.empty() ? nullptr : table.data(), saved, CMatrixMap<double>(dout.data(), S, H), dq, dk, dv, dtab.empty() ? nullptr : dtab.data());

  // device-side arrays (host memory here), capacity rows, NaN past S
  const float nan = NAN;
  std::vector<int> doff(off.begin(), off.end()), dpos(cap, -7);
  for (Index s = 0; s < S; ++s) dpos[s] = int(pos[s]);
  std::vector<std::uint8_t> dvalid(cap, 1); std::copy(valid.begin(), valid.end(), dvalid.begin());
  auto fl = [&](const Matrix<double>& m, Index w) { std::vector<float> r(cap * w, nan); for (Index i = 0; i < m.size(); ++i) r[i] = float(m.data()[i]); return r; };
  std::vector<float> fq = fl(q, Z), fk = fl(k, Z), fv = fl(v, H), fdout = fl(dout, H);
  std::vector<float> ftable(table.begin(), table.end()); if (ftable.empty()) ftable.push_back(0);
  std::vector<float> fout(cap * H, 12345.f), fstat(cap, 12345.f), fdq(cap * Z, 12345.f), fdk(cap * Z, 12345.f), fdv(cap * H, 12345.f), fdtab(std::max<Index>(ts, 1), 0.25f);
  if (c.pos == PE::rotary) { rotate(fq, S, Z, dpos, 1e4, 1); rotate(fk, S, Z, dpos, 1e4, 1); }

  cuda::attn::LocalAttentionBackwardParams p{};
  p.batch = int(c.lengths.size()); p.capacity = int(cap); p.z = int(Z); p.h = int(H);
  p.window = int(c.W); p.causal = c.dir == Direction::causal; p.activation = int(c.act); p.position = int(c.pos); p.max_positions = int(c.P);
  p.table_size = int(ts);
  p.scale = float(cfg.query_scale(Z));
  p.vec_z = Z % 4 == 0; p.vec_h = H % 4 == 0;
  p.offsets = doff.data(); p.positions = dpos.data(); p.key_valid = use_valid ? dvalid.data() : nullptr;
  p.q = fq.data(); p.k = fk.data(); p.v = fv.data(); p.bias_table = ts ? ftable.data() : nullptr;
  p.out = fout.data(); p.row_stat = c.act == AA::softmax ? fstat.data() : nullptr;
  const bool drop = c.dropout > 0;
  if (drop) {  // as make_params (launch.cuh)
    p.drop_seed = cfg.dropout_seed; p.drop_draw = nullptr;
    p.drop_threshold = static_cast<std::uint64_t>(c.dropout * 9007199254740992.0);
    p.drop_keep = static_cast<float>(1.0 / (1.0 - c.dropout));
  }
  const unsigned rows = unsigned((cap + 63) / 64), cols = unsigned((H + 255) / 256);
  cuda::attn::LocalAttentionParams pf = p;
  if (drop) emu::launch(dim3(rows, cols), [&] { cuda::attn::local_attention_forward_kernel<Tr, true>(pf); });
  else emu::launch(dim3(rows, cols), [&] { cuda::attn::local_attention_forward_kernel<Tr>(pf); });
  // backward
  std::vector<float> delta(cap, 0.f);
  for (Index i = 0; i < S; ++i) { float a = 0; for (Index h = 0; h < H; ++h) a = std::fma(fdout[i * H + h], fout[i * H + h], a); delta[i] = a; }
  std::vector<double> partial(rows * std::max<Index>(ts, 1), -999.0); std::vector<int> range(2 * rows, -5);
  p.dout = fdout.data(); p.lse = fstat.data(); p.delta = delta.data(); p.dq = fdq.data(); p.dk = fdk.data(); p.dv = fdv.data();
  p.dbias_partial = partial.data(); p.dbias_range = range.data();
  // With a table the dq kernel writes dS into a band (BandGeometry in band_bf16.cuh: W' = min(W, cap) rounded up
  // to 64; width 64 + W' (+ W' bidirectional)); the bias gradient is then summed from it here, on the host.
  const int wpad = int((std::min<Index>(c.W, cap) + 63) / 64 * 64);
  p.band_wpad = wpad; p.band_width = 64 + wpad + (c.dir == Direction::causal ? 0 : wpad);
  std::vector<float> dsband(ts ? size_t(rows) * 64 * p.band_width : 1, nan);
  p.dsband = dsband.data();
  if (drop) {
    emu::launch(dim3(rows), [&] { cuda::attn::local_attention_dq_kernel<Tr, true>(p); });
    emu::launch(dim3(rows), [&] { cuda::attn::local_attention_dkv_kernel<Tr, false, true>(p); });
    emu::launch(dim3(rows, cols), [&] { cuda::attn::local_attention_dkv_kernel<Tr, true, true>(p); });
  } else {
    emu::launch(dim3(rows), [&] { cuda::attn::local_attention_dq_kernel<Tr>(p); });
    emu::launch(dim3(rows), [&] { cuda::attn::local_attention_dkv_kernel<Tr, false>(p); });
    emu::launch(dim3(rows, cols), [&] { cuda::attn::local_attention_dkv_kernel<Tr, true>(p); });
  }
  if (ts) {
    std::vector<double> acc(ts, 0.0);
    for (size_t b = 0; b + 1 < off.size(); ++b)
      for (Index i = off[b]; i < off[b + 1]; ++i) {
        const Index lo = std::max<Index>(off[b], i - c.W), hi = c.dir == Direction::causal ? i + 1 : std::min<Index>(off[b + 1], i + c.W + 1);
        const Index base = i / 64 * 64 - wpad;
        for (Index j = lo; j < hi; ++j) {
          const Index e = c.pos == PE::simple ? std::clamp<Index>(c.P - 1 + pos[j] - pos[i], 0, 2 * c.P - 2) : 4 * c.W - 1 + (j - i);
          acc[e] += dsband[size_t(i) * p.band_width + size_t(j - base)];
        }
      }
    for (Index e = 0; e < ts; ++e) fdtab[e] += float(acc[e]);
  }
  if (c.pos == PE::rotary) { rotate(fdq, S, Z, dpos, 1e4, -1); rotate(fdk, S, Z, dpos, 1e4, -1); }
  double sc;
  const double eo = maxdiff(fout.data(), out.data(), S * H, &sc);
  double sq, sk, sv, sb = 0;
  const double eq = maxdiff(fdq.data(), dq.data(), S * Z, &sq), ek = maxdiff(fdk.data(), dk.data(), S * Z, &sk), ev = maxdiff(fdv.data(), dv.data(), S * H, &sv);
  const double eb = ts ? maxdiff(fdtab.data(), dtab.data(), ts, &sb) : 0;
  bool untouched = true;
  for (Index i = S * H; i < cap * H; ++i) untouched &= fout[i] == 12345.f && fdv[i] == 12345.f;
  for (Index i = S * Z; i < cap * Z; ++i) untouched &= fdq[i] == 12345.f && fdk[i] == 12345.f;
  double el = 0;
  if (c.act == AA::softmax) for (Index i = 0; i < S; ++i) { double r = saved.row_stat[i]; if (std::isinf(r) != std::isinf(fstat[i])) el = INFINITY; else if (!std::isinf(r)) el = std::max(el, std::abs(r - fstat[i])); }
  const bool ok = eo <= 1e-5 * std::max(sc, 1.0) && eq <= 1e-5 * std::max(sq, 1.0) && ek <= 1e-5 * std::max(sk, 1.0) && ev <= 1e-5 * std::max(sv, 1.0) && eb <= 1e-5 * std::max(sb, 1.0) && el < 1e-4 && untouched;
  std::printf("%s act=%d pos=%d dir=%d Z=%ld H=%ld W=%ld drop=%.1f: out %.2e/%.2e dq %.2e/%.2e dk %.2e/%.2e dv %.2e/%.2e db %.2e/%.2e lse %.2e untouched %d\n",
              ok ? "OK  " : "FAIL", int(c.act), int(c.pos), int(c.dir), long(Z), long(H), long(c.W), c.dropout, eo, sc, eq, sq, ek, sk, ev, sv, eb, sb, el, int(untouched));
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  const Direction C = Direction::causal, Bi = Direction::bidirectional;
  std::vector<Case> cases = {
      {{37, 0, 150, 5, 70}, 16, 24, 8, C, AA::relu2, PE::simple, 16, 1.0, 5, 1},
      {{100, 3, 0, 64, 129}, 32, 40, 40, Bi, AA::relu2, PE::simple, 64, 0.8, 9, 2},
      {{65, 64, 1, 200}, 64, 72, 16, C, AA::softmax, PE::rotary, 16, 0.6, 3, 3},
      {{33, 17, 0, 90}, 8, 300, 5, Bi, AA::softmax, PE::simple, 8, 1.0, 64, 4},
      {{50, 0, 77}, 10, 19, 7, C, AA::laplace, PE::local_simple, 16, 1.0, 1, 5},
      {{20, 30, 9}, 4, 4, 600, C, AA::softmax, PE::none, 16, 0.15, 4, 9},
      {{129, 1, 128}, 20, 64, 1, C, AA::relu2, PE::local_simple, 16, 0.7, 63, 10},
      {{45, 70}, 64, 100, 12, Bi, AA::laplace, PE::simple, 4, 0.5, 1, 12},
      {{1, 2, 3, 4, 5, 50}, 6, 8, 3, Bi, AA::relu2, PE::rotary, 16, 1.0, 2, 8},
      {{300, 41}, 16, 16, 70, Bi, AA::relu2, PE::simple, 20, 1.0, 3, 13},
      {{200, 5}, 8, 8, 90, C, AA::softmax, PE::simple, 1, 0.7, 3, 14},
      // attention dropout (the kDropout instantiations against the CPU op with the same seed)
      {{37, 0, 150, 5, 70}, 16, 24, 8, C, AA::relu2, PE::simple, 16, 1.0, 5, 21, 0.3},
      {{65, 64, 1, 200}, 64, 72, 16, C, AA::softmax, PE::rotary, 16, 0.6, 3, 23, 0.2},
      {{33, 17, 0, 90}, 8, 300, 5, Bi, AA::softmax, PE::simple, 8, 1.0, 64, 24, 0.5},
      {{45, 70}, 64, 100, 12, Bi, AA::laplace, PE::local_simple, 4, 0.5, 1, 25, 0.1},
  };
  int which = argc > 1 ? std::atoi(argv[1]) : -1;
  int fails = 0;
  for (size_t i = 0; i < cases.size(); ++i) if (which < 0 || which == int(i)) fails += run(cases[i]);
  return fails;
}
