// sma::cuda::local_attention_{forward,backward} against the CPU op sma::ops::local_attention_{forward,backward}:
// every output and gradient, on random ragged batches (an empty row, rows shorter than the window, windows longer
// than the compressed length, masked keys and queries that see no key), with the FlashAttention accuracy rule
// (device error <= 2x the float CPU error against the double CPU path + a small floor). Also: launches for a
// capacity larger than S (rows past S neither read, they hold NaN, nor written), bitwise determinism of the
// backward, the compress -> attention pipeline with S left on the device, and the error messages. The same cases
// again on the bf16 tensor-core path (LocalAttentionConfig::bf16) with a bf16 accuracy rule (see bf16_ok).
#include "cuda_test_support.hpp"

#include <sma/cuda/bounded_gemm.hpp>
#include <sma/cuda/compress.hpp>
#include <sma/cuda/dropout.hpp>
#include <sma/cuda/local_attention.hpp>
#include <sma/ops/compress.hpp>
#include <sma/ops/local_attention.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <random>
#include <string>
#include <vector>

using namespace sma;
using cuda_test::accuracy;

namespace {

using AA = ops::AttentionActivation;
using PE = ops::PositionEncoding;

static_assert(static_cast<int>(cuda::Activation::softmax) == static_cast<int>(AA::softmax) &&
                  static_cast<int>(cuda::Activation::laplace) == static_cast<int>(AA::laplace),
              "sma::cuda::Activation must follow sma::ops::AttentionActivation");
static_assert(static_cast<int>(cuda::Position::rotary) == static_cast<int>(PE::rotary) &&
                  static_cast<int>(cuda::Position::local_simple) == static_cast<int>(PE::local_simple),
              "sma::cuda::Position must follow sma::ops::PositionEncoding");

struct Case {
  std::vector<Index> lengths;
  Index Z, H, W;
  Direction dir;
  AA act;
  PE pos;
  Index P = 16;
  double valid_prob = 1.0;  // < 1: random key_valid mask
  Index extra = 5;          // capacity - S
  unsigned seed = 1;
  bool bf16 = false;        // the bf16 tensor-core path
  double dropout = 0.0;     // attention dropout (the CPU op's mask for the same seed)
  std::uint64_t dropout_seed = 0;
  std::uint64_t draw = 0;   // > 0: the device reads this draw from device memory (LocalAttentionConfig::dropout_draw)
};

std::string describe(const Case& c) {
  std::string lens;
  for (Index l : c.lengths) lens += str_cat(l, ",");
  return str_cat(ops::to_string(c.act), " ", ops::to_string(c.pos), " ", to_string(c.dir), " Z=", c.Z, " H=", c.H,
                 " W=", c.W, " P=", c.P, " rows=", lens, " valid_prob=", c.valid_prob, c.bf16 ? " bf16" : "",
                 c.dropout > 0 ? str_cat(" dropout=", c.dropout, " seed=", c.dropout_seed, " draw=", c.draw) : "");
}

ops::LocalAttentionConfig cpu_config(const Case& c) {
  ops::LocalAttentionConfig cfg;
  cfg.window = c.W;
  cfg.direction = c.dir;
  cfg.activation = c.act;
  cfg.position = c.pos;
  cfg.max_positions = c.P;
  cfg.dropout = c.dropout;
  // The device's mask of draw k is the CPU op's for the seed dropout_key(seed, k, attention).
  cfg.dropout_seed = c.draw > 0 ? cuda::dropout_key(c.dropout_seed, c.draw, cuda::DropoutSite::attention)
                                : c.dropout_seed;
  return cfg;
}

cuda::LocalAttentionConfig gpu_config(const Case& c) {
  cuda::LocalAttentionConfig cfg;
  cfg.window = static_cast<int>(c.W);
  cfg.causal = c.dir == Direction::causal;
  cfg.activation = static_cast<cuda::Activation>(static_cast<int>(c.act));
  cfg.position = static_cast<cuda::Position>(static_cast<int>(c.pos));
  cfg.max_positions = static_cast<int>(c.P);
  cfg.bf16 = c.bf16;
  cfg.dropout = c.dropout;
  cfg.dropout_seed = c.dropout_seed;  // run_gpu sets dropout_draw when c.draw > 0
  return cfg;
}

Case as_bf16(Case c) {
  c.bf16 = true;
  return c;
}

// The bf16 path writes zeros to the rows past S of the chunks its bounded products run (cuda::bounded_gemm) and
// leaves the rest untouched: each entry is zero or the sentinel.
bool zero_or_sentinel(const std::vector<float>& v, std::size_t from) {
  const float s = cuda_test::sentinel();
  for (std::size_t i = from; i < v.size(); ++i)
    if (v[i] != 0.f && std::memcmp(&v[i], &s, sizeof s) != 0) return false;
  return true;
}

// The bf16 rule. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3); the path rounds q', k', v, dout
// once and the weights A and dS once more, and accumulates in fp32. A result that sums n terms of random sign
// (out = sum_j a_ij v_j, dq, dk, dv, the bias gradient) carries about sqrt(n) u |term| of rounding error, the same
// order as its own magnitude sqrt(n) |term| times u, i.e. a few u relative to the tensor's largest entry, plus the
// error of the scores (u relative to sum_z |q'_z k'_z|) propagated through the activation. 2e-2 (about 10 u) bounds
// that with margin and still fails for any indexing or masking error (those are O(1) relative).
struct Bf16Accuracy {
  double err = 0, scale = 0;
  bool ok() const { return err <= 2e-2 * std::max(scale, 1e-3); }
};
std::ostream& operator<<(std::ostream& os, const Bf16Accuracy& a) {
  return os << "bf16 err " << a.err << ", max |ref| " << a.scale << ", relative " << a.err / std::max(a.scale, 1e-3)
            << (a.ok() ? " (ok)" : " (FAIL)");
}
Bf16Accuracy bf16_accuracy(const float* gpu, const double* ref, std::size_t n) {
  return {cuda_test::max_abs_diff(gpu, ref, n), cuda_test::max_abs(ref, n)};
}

// The problem in double (the reference) and its float copy.
struct Problem {
  std::vector<Index> offsets;
  Index S = 0;
  std::vector<std::int64_t> pos;
  std::vector<std::uint8_t> valid;
  bool use_valid = false;
  Matrix<double> q, k, v, dout;
  std::vector<double> table;
  Matrix<float> qf, kf, vf, doutf;
  std::vector<float> tablef;

  template <class T>
  ops::LocalAttentionInput<T> input(const Matrix<T>& q_, const Matrix<T>& k_, const Matrix<T>& v_) const {
    return {CMatrixMap<T>(q_.data(), S, q_.cols()), CMatrixMap<T>(k_.data(), S, k_.cols()),
            CMatrixMap<T>(v_.data(), S, v_.cols()), &offsets, &pos, use_valid ? &valid : nullptr};
  }
};

Problem make_problem(const Case& c) {
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0), u01(0.0, 1.0);
  std::uniform_int_distribution<int> gap(1, 3);
  Problem p;
  p.offsets.assign(1, 0);
  for (Index l : c.lengths) p.offsets.push_back(p.offsets.back() + l);
  p.S = p.offsets.back();
  for (std::size_t b = 0; b + 1 < p.offsets.size(); ++b) {
    std::int64_t t = gap(rng) - 1;
    for (Index s = p.offsets[b]; s < p.offsets[b + 1]; ++s, t += gap(rng)) p.pos.push_back(t);
  }
  p.use_valid = c.valid_prob < 1.0;
  for (Index s = 0; s < p.S; ++s) p.valid.push_back(u01(rng) < c.valid_prob ? 1 : 0);
  // Scores of order one whatever the activation's scale: relu2/laplace scale by 1/W or 1/(2W).
  const double qa = c.act == AA::softmax ? 1.5 : 1.5 * (c.dir == Direction::causal ? c.W : 2 * c.W) / std::sqrt(c.Z);
  p.q.resize(p.S, c.Z);
  p.k.resize(p.S, c.Z);
  p.v.resize(p.S, c.H);
  p.dout.resize(p.S, c.H);
  for (Index i = 0; i < p.q.size(); ++i) p.q.data()[i] = qa * u(rng);
  for (Index i = 0; i < p.k.size(); ++i) p.k.data()[i] = u(rng);
  for (Index i = 0; i < p.v.size(); ++i) p.v.data()[i] = u(rng);
  for (Index i = 0; i < p.dout.size(); ++i) p.dout.data()[i] = u(rng);
  const Index ts = cpu_config(c).bias_table_size();
  for (Index e = 0; e < ts; ++e) p.table.push_back(0.5 * u(rng));
  // The reference is the double problem rounded to float, so both paths see the same numbers.
  p.qf = p.q.cast<float>();
  p.kf = p.k.cast<float>();
  p.vf = p.v.cast<float>();
  p.doutf = p.dout.cast<float>();
  p.q = p.qf.cast<double>();
  p.k = p.kf.cast<double>();
  p.v = p.vf.cast<double>();
  p.dout = p.doutf.cast<double>();
  for (double& t : p.table) t = static_cast<float>(t);
  p.tablef.assign(p.table.begin(), p.table.end());
  return p;
}

struct GpuResult {
  std::vector<float> out, row_stat, dq, dk, dv, dbias;
};

// Runs forward + backward on the device with `capacity` = S + c.extra rows (NaN past S), checks that no row past S
// was written (the bf16 path: zero or untouched, row_stat untouched), and returns the first S rows.
GpuResult run_gpu(const Case& c, const Problem& p, float dbias_init) {
  const Index cap = p.S + c.extra;
  std::vector<int> off(p.offsets.begin(), p.offsets.end());
  std::vector<int> pos(static_cast<std::size_t>(cap), -7);
  std::copy(p.pos.begin(), p.pos.end(), pos.begin());
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(cap), 1);
  std::copy(p.valid.begin(), p.valid.end(), valid.begin());
  cuda::DeviceArray<int> d_off(off), d_pos(pos);
  cuda::DeviceArray<std::uint8_t> d_valid(valid);
  auto d_q = cuda_test::upload_rows(p.qf, cap), d_k = cuda_test::upload_rows(p.kf, cap),
       d_v = cuda_test::upload_rows(p.vf, cap), d_dout = cuda_test::upload_rows(p.doutf, cap);
  const float sen = cuda_test::sentinel();
  cuda::DeviceArray<float> d_out(std::vector<float>(static_cast<std::size_t>(cap * c.H), sen));
  cuda::DeviceArray<float> d_stat(std::vector<float>(static_cast<std::size_t>(cap), sen));
  cuda::DeviceArray<float> d_dq(std::vector<float>(static_cast<std::size_t>(cap * c.Z), sen));
  cuda::DeviceArray<float> d_dk(std::vector<float>(static_cast<std::size_t>(cap * c.Z), sen));
  cuda::DeviceArray<float> d_dv(std::vector<float>(static_cast<std::size_t>(cap * c.H), sen));
  const std::size_t ts = p.tablef.size();
  cuda::DeviceArray<float> d_table(p.tablef.empty() ? std::vector<float>{0.f} : p.tablef);
  cuda::DeviceArray<float> d_dtable(std::vector<float>(std::max<std::size_t>(ts, 1), dbias_init));

  cuda::LocalAttentionInputs in;
  in.batch = static_cast<int>(c.lengths.size());
  in.capacity = static_cast<int>(cap);
  in.z = static_cast<int>(c.Z);
  in.h = static_cast<int>(c.H);
  in.offsets = d_off.data();
  in.positions = d_pos.data();
  in.key_valid = p.use_valid ? d_valid.data() : nullptr;
  in.q = d_q.data();
  in.k = d_k.data();
  in.v = d_v.data();
  cuda::LocalAttentionConfig cfg = gpu_config(c);
  const cuda::DeviceArray<std::uint64_t> d_draw(std::vector<std::uint64_t>{c.draw});
  if (c.draw > 0) cfg.dropout_draw = d_draw.data();
  cuda::Stream stream;
  cuda::local_attention_forward(cfg, in, d_table.data(), d_out.data(), d_stat.data(), stream.handle());
  cuda::local_attention_backward(cfg, in, d_table.data(), d_out.data(), d_stat.data(), d_dout.data(), d_dq.data(),
                                 d_dk.data(), d_dv.data(), ts ? d_dtable.data() : nullptr, stream.handle());
  stream.synchronize();

  GpuResult r;
  r.out = d_out.download();
  r.row_stat = d_stat.download();
  r.dq = d_dq.download();
  r.dk = d_dk.download();
  r.dv = d_dv.download();
  r.dbias = d_dtable.download();
  const auto S = static_cast<std::size_t>(p.S);
  const auto untouched = [&](const std::vector<float>& v, std::size_t from) {
    return c.bf16 ? zero_or_sentinel(v, from) : cuda_test::all_sentinel(v, from);
  };
  CHECK(untouched(r.out, S * c.H));
  CHECK(untouched(r.dq, S * c.Z));
  CHECK(untouched(r.dk, S * c.Z));
  CHECK(untouched(r.dv, S * c.H));
  if (c.act == AA::softmax) CHECK(cuda_test::all_sentinel(r.row_stat, S));
  r.out.resize(S * c.H);
  r.row_stat.resize(S);
  r.dq.resize(S * c.Z);
  r.dk.resize(S * c.Z);
  r.dv.resize(S * c.H);
  r.dbias.resize(ts);
  return r;
}

void check_case(const Case& c) {
  INFO(describe(c));
  const Problem p = make_problem(c);
  const ops::LocalAttentionConfig cfg = cpu_config(c);
  const std::size_t S = static_cast<std::size_t>(p.S);

  ops::LocalAttentionSaved<double> saved_d;
  ops::LocalAttentionSaved<float> saved_f;
  const Matrix<double> out_d =
      ops::local_attention_forward(cfg, p.input(p.q, p.k, p.v), p.table.empty() ? nullptr : p.table.data(), &saved_d);
  const Matrix<float> out_f = ops::local_attention_forward(cfg, p.input(p.qf, p.kf, p.vf),
                                                           p.tablef.empty() ? nullptr : p.tablef.data(), &saved_f);
  Matrix<double> dq_d, dk_d, dv_d;
  Matrix<float> dq_f, dk_f, dv_f;
  const float init = 0.25f;
  std::vector<double> dtab_d(p.table.size(), init);
  std::vector<float> dtab_f(p.table.size(), init);
  ops::local_attention_backward(cfg, p.input(p.q, p.k, p.v), p.table.empty() ? nullptr : p.table.data(), saved_d,
                                CMatrixMap<double>(p.dout.data(), p.S, c.H), dq_d, dk_d, dv_d,
                                dtab_d.empty() ? nullptr : dtab_d.data());
  ops::local_attention_backward(cfg, p.input(p.qf, p.kf, p.vf), p.tablef.empty() ? nullptr : p.tablef.data(),
                                saved_f, CMatrixMap<float>(p.doutf.data(), p.S, c.H), dq_f, dk_f, dv_f,
                                dtab_f.empty() ? nullptr : dtab_f.data());

  GpuResult g = run_gpu(c, p, init);
  CHECK(cuda_test::all_finite(g.out, g.out.size()));
  CHECK(cuda_test::all_finite(g.dq, g.dq.size()));
  CHECK(cuda_test::all_finite(g.dk, g.dk.size()));
  CHECK(cuda_test::all_finite(g.dv, g.dv.size()));
  if (c.bf16) {
    const auto b_out = bf16_accuracy(g.out.data(), out_d.data(), S * c.H);
    const auto b_dq = bf16_accuracy(g.dq.data(), dq_d.data(), S * c.Z);
    const auto b_dk = bf16_accuracy(g.dk.data(), dk_d.data(), S * c.Z);
    const auto b_dv = bf16_accuracy(g.dv.data(), dv_d.data(), S * c.H);
    INFO("out: " << b_out);
    INFO("dq: " << b_dq);
    INFO("dk: " << b_dk);
    INFO("dv: " << b_dv);
    CHECK(b_out.ok());
    CHECK(b_dq.ok());
    CHECK(b_dk.ok());
    CHECK(b_dv.ok());
    if (!p.table.empty()) {
      std::vector<double> ref(dtab_d.begin(), dtab_d.end());
      for (double& x : ref) x -= init;  // the gradient itself, not the value it was added to
      std::vector<float> got(g.dbias.begin(), g.dbias.end());
      for (float& x : got) x -= init;
      auto b_db = bf16_accuracy(got.data(), ref.data(), ref.size());
      // A table entry's gradient is a sum over many pairs that can cancel to nothing: the one-entry softmax table's
      // is exactly zero (each query's weights sum to one). Its rounding error still scales with the terms, which
      // are of order one here (v, dout in (-1, 1)), hence the floor of 1 under the scale.
      b_db.scale = std::max(b_db.scale, 1.0);
      INFO("dbias: " << b_db);
      CHECK(b_db.ok());
    }
    if (c.act == AA::softmax) {
      std::size_t mismatched_inf = 0;
      std::vector<double> lse_d(saved_d.row_stat.data(), saved_d.row_stat.data() + S);
      std::vector<float> lse_g(g.row_stat.begin(), g.row_stat.end());
      for (std::size_t i = 0; i < S; ++i) {
        if (std::isinf(lse_d[i]) != std::isinf(lse_g[i])) ++mismatched_inf;
        if (std::isinf(lse_d[i])) lse_g[i] = 0, lse_d[i] = 0;
      }
      CHECK(mismatched_inf == 0);
      auto b_lse = bf16_accuracy(lse_g.data(), lse_d.data(), S);
      b_lse.scale = std::max(b_lse.scale, 1.0);  // a log: absolute error against scores of order one
      INFO("row_stat: " << b_lse);
      CHECK(b_lse.ok());
    }
    return;
  }
  const auto a_out = accuracy(g.out.data(), out_f.data(), out_d.data(), S * c.H);
  const auto a_dq = accuracy(g.dq.data(), dq_f.data(), dq_d.data(), S * c.Z);
  const auto a_dk = accuracy(g.dk.data(), dk_f.data(), dk_d.data(), S * c.Z);
  const auto a_dv = accuracy(g.dv.data(), dv_f.data(), dv_d.data(), S * c.H);
  INFO("out: " << a_out);
  INFO("dq: " << a_dq);
  INFO("dk: " << a_dk);
  INFO("dv: " << a_dv);
  CHECK(a_out.ok());
  CHECK(a_dq.ok());
  CHECK(a_dk.ok());
  CHECK(a_dv.ok());
  if (!p.table.empty()) {
    const auto a_db = accuracy(g.dbias.data(), dtab_f.data(), dtab_d.data(), p.table.size());
    INFO("dbias: " << a_db);
    CHECK(a_db.ok());
  }
  if (c.act == AA::softmax) {
    // +inf where a query sees no key, as on the CPU; elsewhere the log-sum-exp.
    std::vector<float> lse_f(saved_f.row_stat.data(), saved_f.row_stat.data() + S);
    std::vector<double> lse_d(saved_d.row_stat.data(), saved_d.row_stat.data() + S);
    std::size_t mismatched_inf = 0;
    for (std::size_t i = 0; i < S; ++i) {
      if (std::isinf(lse_d[i]) != std::isinf(g.row_stat[i])) ++mismatched_inf;
      if (std::isinf(lse_d[i])) lse_f[i] = g.row_stat[i] = 0, lse_d[i] = 0;
    }
    CHECK(mismatched_inf == 0);
    const auto a_lse = accuracy(g.row_stat.data(), lse_f.data(), lse_d.data(), S);
    INFO("row_stat: " << a_lse);
    CHECK(a_lse.ok());
  }
}

/// The shapes both paths are checked on: ragged rows, empty rows, windows longer than the rows, every activation
/// and position encoding, a one-entry table.
std::vector<Case> shared_cases() {
  const Direction C = Direction::causal, Bi = Direction::bidirectional;
  return {
      {{37, 0, 150, 5, 70}, 16, 24, 8, C, AA::relu2, PE::simple, 16, 1.0, 5, 1},
      {{100, 3, 0, 64, 129}, 32, 40, 40, Bi, AA::relu2, PE::simple, 64, 0.8, 9, 2},
      {{65, 64, 1, 200}, 64, 72, 16, C, AA::softmax, PE::rotary, 16, 0.6, 3, 3},
      {{33, 17, 0, 90}, 8, 300, 5, Bi, AA::softmax, PE::simple, 8, 1.0, 64, 4},
      {{50, 0, 77}, 10, 19, 7, C, AA::laplace, PE::local_simple, 16, 1.0, 1, 5},
      {{300, 150}, 128, 256, 64, Bi, AA::relu2, PE::none, 16, 1.0, 0, 6},
      {{250, 0, 40}, 128, 130, 100, Bi, AA::softmax, PE::local_simple, 16, 0.9, 70, 7},
      {{1, 2, 3, 4, 5, 50}, 6, 8, 3, Bi, AA::relu2, PE::rotary, 16, 1.0, 2, 8},
      {{20, 30, 9}, 4, 4, 600, C, AA::softmax, PE::none, 16, 0.15, 4, 9},
      {{129, 1, 128}, 20, 64, 1, C, AA::relu2, PE::local_simple, 16, 0.7, 63, 10},
      {{200}, 36, 48, 33, C, AA::laplace, PE::rotary, 16, 1.0, 200, 11},
      {{45, 70}, 64, 100, 12, Bi, AA::laplace, PE::simple, 4, 0.5, 1, 12},
      {{300, 41}, 16, 16, 70, Bi, AA::relu2, PE::simple, 20, 1.0, 3, 13},  // most pairs hit the clamped ends
      {{200, 5}, 8, 8, 90, C, AA::softmax, PE::simple, 1, 0.7, 3, 14},     // a one-entry table
  };
}

// ---- caller-written padded operands (LocalAttentionInputs::*_padded) ----

constexpr std::uint16_t kBf16Nan = 0x7fc0;  // what the rows a caller need not write hold in these tests

std::uint16_t bf16_bits(float f) {  // round to nearest even, as __float2bfloat16_rn (finite values)
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The problem's device arrays at capacity `cap` (NaN past S) and the inputs pointing at them.
struct DeviceProblem {
  cuda::DeviceArray<int> off, pos;
  cuda::DeviceArray<std::uint8_t> valid;
  cuda::DeviceArray<float> q, k, v, dout, table;
  cuda::LocalAttentionInputs in;

  DeviceProblem(const Case& c, const Problem& p, Index cap) {
    std::vector<int> o(p.offsets.begin(), p.offsets.end()), ps(static_cast<std::size_t>(cap), -7);
    std::copy(p.pos.begin(), p.pos.end(), ps.begin());
    std::vector<std::uint8_t> va(static_cast<std::size_t>(cap), 1);
    std::copy(p.valid.begin(), p.valid.end(), va.begin());
    off = cuda::DeviceArray<int>(o);
    pos = cuda::DeviceArray<int>(ps);
    valid = cuda::DeviceArray<std::uint8_t>(va);
    q = cuda_test::upload_rows(p.qf, cap);
    k = cuda_test::upload_rows(p.kf, cap);
    v = cuda_test::upload_rows(p.vf, cap);
    dout = cuda_test::upload_rows(p.doutf, cap);
    table = cuda::DeviceArray<float>(p.tablef.empty() ? std::vector<float>{0.f} : p.tablef);
    in.batch = static_cast<int>(c.lengths.size());
    in.capacity = static_cast<int>(cap);
    in.z = static_cast<int>(c.Z);
    in.h = static_cast<int>(c.H);
    in.offsets = off.data();
    in.positions = pos.data();
    in.key_valid = p.use_valid ? valid.data() : nullptr;
  }
};

// Every output of a forward + backward over all `capacity` rows (rows past S included: zero or the sentinel).
struct FullResult {
  std::vector<float> out, row_stat, dq, dk, dv, dbias;
};

// Forward + backward with the fp32 operands (padded = nullptr: the attention pads them itself) or with the four
// caller-written padded buffers (q, k, v, dout), the fp32 q, k, v then nullptr and dout too unless softmax.
FullResult run_full(const Case& c, DeviceProblem& d, cuda::DeviceArray<std::uint16_t>* padded) {
  const std::size_t cap = static_cast<std::size_t>(d.in.capacity), ts = d.table.size();
  const float sen = cuda_test::sentinel();
  cuda::DeviceArray<float> out(std::vector<float>(cap * c.H, sen)), stat(std::vector<float>(cap, sen));
  cuda::DeviceArray<float> dq(std::vector<float>(cap * c.Z, sen)), dk(std::vector<float>(cap * c.Z, sen));
  cuda::DeviceArray<float> dv(std::vector<float>(cap * c.H, sen)), dtable(std::vector<float>(ts, 0.25f));
  cuda::LocalAttentionInputs in = d.in;
  const float* dout = d.dout.data();
  if (padded) {
    in.q_padded = padded[0].data();
    in.k_padded = padded[1].data();
    in.v_padded = padded[2].data();
    in.dout_padded = padded[3].data();
    if (c.act != AA::softmax) dout = nullptr;
  } else {
    in.q = d.q.data();
    in.k = d.k.data();
    in.v = d.v.data();
  }
  const cuda::LocalAttentionConfig cfg = gpu_config(c);
  const bool table = cfg.bias_table_size() > 0;
  cuda::Stream stream;
  cuda::local_attention_forward(cfg, in, d.table.data(), out.data(), stat.data(), stream.handle());
  cuda::local_attention_backward(cfg, in, d.table.data(), out.data(), stat.data(), dout, dq.data(), dk.data(),
                                 dv.data(), table ? dtable.data() : nullptr, stream.handle());
  stream.synchronize();
  return {out.download(), stat.download(), dq.download(), dk.download(), dv.download(), dtable.download()};
}

// The padded image of operand `which` as local_attention_pad_bf16 writes it (rows it does not write: NaN), then
// every row past S set to NaN: what a caller must provide is rows [offset, offset + S) and zero rows [0, offset).
std::vector<std::uint16_t> caller_image(const Case& c, DeviceProblem& d, cuda::PaddedOperand which, Index S) {
  const cuda::LocalAttentionConfig cfg = gpu_config(c);
  const cuda::PaddedLayout lay = cuda::local_attention_padded_layout(cfg, d.in.capacity);
  const bool qk = which == cuda::PaddedOperand::q || which == cuda::PaddedOperand::k;
  const long long w = qk ? c.Z : c.H;
  const float* src = which == cuda::PaddedOperand::q   ? d.q.data()
                     : which == cuda::PaddedOperand::k ? d.k.data()
                     : which == cuda::PaddedOperand::v ? d.v.data()
                                                       : d.dout.data();
  cuda::DeviceArray<std::uint16_t> buf(std::vector<std::uint16_t>(static_cast<std::size_t>(lay.rows * w), kBf16Nan));
  cuda::local_attention_pad_bf16(cfg, d.in, which, src, buf.data());
  std::vector<std::uint16_t> img = buf.download();
  std::size_t nonzero_head = 0;
  for (long long r = 0; r < lay.rows; ++r)
    for (long long j = 0; j < w; ++j) {
      std::uint16_t& x = img[static_cast<std::size_t>(r * w + j)];
      if (r < lay.offset) nonzero_head += x != 0;  // the pad helper's own zero rows
      if (r >= lay.offset + S) x = kBf16Nan;
    }
  CHECK(nonzero_head == 0);
  return img;
}

bool same_bits(const FullResult& a, const FullResult& b) {
  bool ok = true;
  for (const auto& [x, y, name] : {std::tuple{&a.out, &b.out, "out"}, {&a.row_stat, &b.row_stat, "row_stat"},
                                   {&a.dq, &b.dq, "dq"}, {&a.dk, &b.dk, "dk"}, {&a.dv, &b.dv, "dv"},
                                   {&a.dbias, &b.dbias, "dbias"}}) {
    const bool eq = cuda_test::bitwise_equal(*x, *y);
    INFO(name << (eq ? " bitwise equal" : " DIFFERS"));
    CHECK(eq);
    ok = ok && eq;
  }
  return ok;
}

// The attention with caller-written padded operands gives the same bits as the attention padding its fp32 inputs
// itself. Then a second problem with a smaller S on the same buffers, written only on its own rows (the larger
// call's rows stay behind them, NaN after those): again the same bits.
void check_padded_case(const Case& c, const Case& smaller) {
  INFO(describe(c) << " then " << describe(smaller));
  const Problem p = make_problem(c), p2 = make_problem(smaller);
  const Index cap = p.S + c.extra;
  REQUIRE(p2.S <= cap);
  DeviceProblem d(c, p, cap);
  const cuda::PaddedOperand ops4[4] = {cuda::PaddedOperand::q, cuda::PaddedOperand::k, cuda::PaddedOperand::v,
                                       cuda::PaddedOperand::dout};
  cuda::DeviceArray<std::uint16_t> bufs[4];
  for (int i = 0; i < 4; ++i) bufs[i] = cuda::DeviceArray<std::uint16_t>(caller_image(c, d, ops4[i], p.S));
  // Without rotary the slots are the fp32 values rounded to bf16: the layout checked against the host's rounding.
  if (c.pos != PE::rotary) {
    const cuda::PaddedLayout lay = cuda::local_attention_padded_layout(gpu_config(c), static_cast<int>(cap));
    const std::vector<std::uint16_t> qi = bufs[0].download(), vi = bufs[2].download();
    std::size_t bad = 0;
    for (Index s = 0; s < p.S; ++s) {
      for (Index j = 0; j < c.Z; ++j)
        bad += qi[static_cast<std::size_t>((lay.offset + s) * c.Z + j)] != bf16_bits(p.qf(s, j));
      for (Index j = 0; j < c.H; ++j)
        bad += vi[static_cast<std::size_t>((lay.offset + s) * c.H + j)] != bf16_bits(p.vf(s, j));
    }
    CHECK(bad == 0);
  }
  const FullResult own = run_full(c, d, nullptr);
  const FullResult given = run_full(c, d, bufs);
  CHECK(same_bits(own, given));

  // The smaller problem at the same capacity (same layout): the caller rewrites rows [offset, offset + S2) only.
  Case c2 = smaller;
  c2.extra = cap - p2.S;
  DeviceProblem d2(c2, p2, cap);
  for (int i = 0; i < 4; ++i) {
    const std::vector<std::uint16_t> fresh = caller_image(c2, d2, ops4[i], p2.S);
    std::vector<std::uint16_t> img = bufs[i].download();
    const cuda::PaddedLayout lay = cuda::local_attention_padded_layout(gpu_config(c2), static_cast<int>(cap));
    const bool qk = i < 2;
    const long long w = qk ? c.Z : c.H;
    std::copy(fresh.begin() + lay.offset * w, fresh.begin() + (lay.offset + p2.S) * w, img.begin() + lay.offset * w);
    bufs[i].upload(img);
  }
  const FullResult own2 = run_full(c2, d2, nullptr);
  const FullResult given2 = run_full(c2, d2, bufs);
  CHECK(same_bits(own2, given2));
}

}  // namespace

TEST_CASE("cuda local attention matches the CPU op (forward and backward)", "[cuda][attention][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (const Case& c : shared_cases()) check_case(c);
}

TEST_CASE("cuda local attention bf16 matches the CPU op (forward and backward)", "[cuda][attention][bf16][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  std::vector<Case> cases = shared_cases();
  cases.push_back({{500, 300}, 160, 96, 130, Direction::causal, AA::relu2, PE::rotary, 16, 1.0, 17, 15});  // Z > 128: bf16 only
  cases.push_back({{700, 0, 333}, 64, 256, 256, Direction::causal, AA::relu2, PE::rotary, 16, 1.0, 40, 16});  // several 64-slot blocks of W
  for (const Case& c : cases) check_case(as_bf16(c));
}

TEST_CASE("cuda local attention: attention dropout gives the CPU op's results with the same mask (fp32, bf16)",
          "[cuda][attention][dropout][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (Case c : shared_cases()) {
    c.dropout = c.seed % 2 ? 0.3 : 0.1;
    c.dropout_seed = 1000 + c.seed;
    c.draw = c.seed % 3 == 0 ? c.seed : 0;  // some cases take the seed through a device draw counter
    check_case(c);
    check_case(as_bf16(c));
  }
  // The mask matters: the same problem without dropout gives another output, and the dropped share is about p.
  Case c = shared_cases()[1];
  const Problem p = make_problem(c);
  const GpuResult plain = run_gpu(c, p, 0.f);
  c.dropout = 0.4;
  c.dropout_seed = 5;
  const GpuResult dropped = run_gpu(c, p, 0.f);
  CHECK(plain.out != dropped.out);
  const ops::detail::DropoutMask mask(0.4, 5);
  std::size_t off = 0, pairs = 0;
  for (Index i = 0; i < 2000; ++i)
    for (Index j = 0; j < 50; ++j, ++pairs) off += !mask.keep(i, j);
  const double share = static_cast<double>(off) / static_cast<double>(pairs);
  INFO("dropped share " << share);
  CHECK(std::abs(share - 0.4) < 0.01);
  // Rates outside [0, 1) are refused.
  cuda::LocalAttentionConfig bad = gpu_config(c);
  bad.dropout = 1.0;
  cuda::LocalAttentionInputs none;
  none.batch = 0;
  CHECK_THROWS_WITH(cuda::local_attention_forward(bad, none, nullptr, nullptr, nullptr),
                    Catch::Contains("dropout must be in [0, 1)"));
}

TEST_CASE("cuda local attention bf16: products bounded by the device's S match the full products",
          "[cuda][attention][bf16][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  // capacity 190 + 700: 14 blocks of 64 slots, of which the first 3 hold slots; the bounded products (one chunk
  // per block here) skip the other 11, the full ones run all 14. capacity 1100 + 1500: 41 blocks, chunks of 3
  // blocks (192 slots), 6 of 14 chunks run. Both must agree, and with the CPU.
  for (const Case& shape : {Case{{150, 0, 40}, 16, 32, 70, Direction::causal, AA::softmax, PE::rotary, 16, 0.9, 700},
                            Case{{600, 0, 500}, 16, 32, 70, Direction::causal, AA::relu2, PE::rotary, 16, 1.0, 1500}}) {
    for (Direction dir : {Direction::causal, Direction::bidirectional}) {
      Case c = shape;
      c.dir = dir;
      c.seed = 41;
      c.bf16 = true;
      INFO(describe(c));
      check_case(c);
      const Problem p = make_problem(c);
      cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::full);
      const GpuResult full = run_gpu(c, p, 0.f);
      cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::graph);
      const long long launches = cuda::bounded_gemm_stats().launches;
      const GpuResult bounded = run_gpu(c, p, 0.f);
      CHECK(cuda::bounded_gemm_stats().launches == launches + 4);  // forward 2, backward 2
      const auto close = [](const std::vector<float>& a, const std::vector<float>& b) {
        const double scale = std::max(cuda_test::max_abs(b.data(), b.size()), 1e-3);
        return cuda_test::max_abs_diff(a.data(), b.data(), a.size()) <= 1e-5 * scale;
      };
      CHECK(close(bounded.out, full.out));
      CHECK(close(bounded.dq, full.dq));
      CHECK(close(bounded.dk, full.dk));
      CHECK(close(bounded.dv, full.dv));
    }
  }
}

TEST_CASE("cuda local attention: every activation x position x direction", "[cuda][attention]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  unsigned seed = 100;
  for (AA act : {AA::relu2, AA::softmax, AA::laplace})
    for (PE pos : {PE::none, PE::simple, PE::local_simple, PE::rotary})
      for (Direction dir : {Direction::causal, Direction::bidirectional})
        check_case({{90, 0, 13, 161}, 24, 36, 20, dir, act, pos, 32, 0.85, 7, seed++});
}

TEST_CASE("cuda local attention bf16: every activation x position x direction", "[cuda][attention][bf16]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  unsigned seed = 200;
  for (AA act : {AA::relu2, AA::softmax, AA::laplace})
    for (PE pos : {PE::none, PE::simple, PE::local_simple, PE::rotary})
      for (Direction dir : {Direction::causal, Direction::bidirectional})
        check_case(as_bf16({{90, 0, 13, 161}, 24, 36, 20, dir, act, pos, 32, 0.85, 7, seed++}));
}

TEST_CASE("cuda local attention: nothing to do when S = 0", "[cuda][attention][quick][bf16]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (Index extra : {0, 7, 70})
    for (bool bf16 : {false, true}) {
      Case c{{0, 0}, 8, 8, 4, Direction::causal, AA::softmax, PE::simple, 8, 1.0, extra, 1, bf16};
      const Problem p = make_problem(c);
      const GpuResult g = run_gpu(c, p, 0.5f);
      for (float d : g.dbias) CHECK(d == 0.5f);
    }
}

TEST_CASE("cuda local attention backward is deterministic", "[cuda][attention][quick][bf16]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (AA act : {AA::relu2, AA::softmax})
    for (bool bf16 : {false, true}) {
      Case c{{400, 77, 300}, 64, 96, 48, Direction::bidirectional, act, PE::simple, 64, 0.9, 11, 21, bf16};
      INFO(describe(c));
      const Problem p = make_problem(c);
      const GpuResult a = run_gpu(c, p, 0.f), b = run_gpu(c, p, 0.f);
      CHECK(cuda_test::bitwise_equal(a.out, b.out));
      CHECK(cuda_test::bitwise_equal(a.dq, b.dq));
      CHECK(cuda_test::bitwise_equal(a.dk, b.dk));
      CHECK(cuda_test::bitwise_equal(a.dv, b.dv));
      CHECK(cuda_test::bitwise_equal(a.dbias, b.dbias));
    }
}

TEST_CASE("cuda compress -> local attention with S left on the device", "[cuda][attention][compress][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const int B = 4, L = 300, D = 32, H = 40, W = 24;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Tensor2<std::uint8_t> active(B, L);
  std::vector<std::uint8_t> active_flat(static_cast<std::size_t>(B * L));
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < L; ++t) {
      const bool on = b != 2 && std::uniform_int_distribution<int>(0, 99)(rng) < (b == 0 ? 10 : 55);
      active(b, t) = on;
      active_flat[static_cast<std::size_t>(b * L + t)] = on;
    }
  Matrix<float> xq(B * L, D), xk(B * L, D), xv(B * L, H);
  for (Index i = 0; i < xq.size(); ++i) xq.data()[i] = u(rng) * 2;
  for (Index i = 0; i < xk.size(); ++i) xk.data()[i] = u(rng);
  for (Index i = 0; i < xv.size(); ++i) xv.data()[i] = u(rng);
  std::vector<float> table(2 * 64 - 1);
  for (float& t : table) t = 0.5f * u(rng);

  // CPU: plan, compress, attend (double reference and float).
  const Compression plan = plan_compression(active, RoutingSemantics::reference);
  REQUIRE(plan.compressed);
  const Matrix<float> qc = compress<float>(CMatrixMap<float>(xq.data(), B * L, D), plan);
  const Matrix<float> kc = compress<float>(CMatrixMap<float>(xk.data(), B * L, D), plan);
  const Matrix<float> vc = compress<float>(CMatrixMap<float>(xv.data(), B * L, H), plan);
  ops::LocalAttentionConfig cfg;
  cfg.window = W;
  cfg.max_positions = 64;
  const Index S = plan.slots();
  const Matrix<double> qd = qc.cast<double>(), kd = kc.cast<double>(), vd = vc.cast<double>();
  const std::vector<double> tabled(table.begin(), table.end());
  const ops::LocalAttentionInput<double> ind{CMatrixMap<double>(qd.data(), S, D), CMatrixMap<double>(kd.data(), S, D),
                                             CMatrixMap<double>(vd.data(), S, H), &plan.offsets, &plan.positions,
                                             nullptr};
  const ops::LocalAttentionInput<float> inf{CMatrixMap<float>(qc.data(), S, D), CMatrixMap<float>(kc.data(), S, D),
                                            CMatrixMap<float>(vc.data(), S, H), &plan.offsets, &plan.positions,
                                            nullptr};
  const Matrix<double> out_d = ops::local_attention_forward<double>(cfg, ind, tabled.data(), nullptr);
  const Matrix<float> out_f = ops::local_attention_forward<float>(cfg, inf, table.data(), nullptr);

  // Device: the plan's S is never copied to the host; everything runs for capacity B*L.
  cuda::Stream stream;
  cuda::DeviceArray<std::uint8_t> d_active(active_flat);
  cuda::DeviceCompression dplan(B, L);
  cuda::plan_compression(d_active.data(), cuda::CompressionSemantics::reference, dplan.view(), stream.handle());
  cuda::DeviceArray<float> d_xq(std::vector<float>(xq.data(), xq.data() + xq.size()));
  cuda::DeviceArray<float> d_xk(std::vector<float>(xk.data(), xk.data() + xk.size()));
  cuda::DeviceArray<float> d_xv(std::vector<float>(xv.data(), xv.data() + xv.size()));
  cuda::DeviceArray<float> d_q(B * L * D), d_k(B * L * D), d_v(B * L * H), d_out(B * L * H), d_table(table);
  cuda::compress(d_xq.data(), D, dplan.view(), d_q.data(), stream.handle());
  cuda::compress(d_xk.data(), D, dplan.view(), d_k.data(), stream.handle());
  cuda::compress(d_xv.data(), H, dplan.view(), d_v.data(), stream.handle());
  cuda::LocalAttentionInputs in;
  in.batch = B;
  in.capacity = B * L;
  in.z = D;
  in.h = H;
  in.offsets = dplan.view().offsets;
  in.positions = dplan.view().positions;
  in.q = d_q.data();
  in.k = d_k.data();
  in.v = d_v.data();
  cuda::LocalAttentionConfig gcfg;
  gcfg.window = W;
  gcfg.max_positions = 64;
  cuda::local_attention_forward(gcfg, in, d_table.data(), d_out.data(), nullptr, stream.handle());
  stream.synchronize();
  std::vector<float> out = d_out.download();
  REQUIRE(dplan.offsets().back() == S);
  const auto a = accuracy(out.data(), out_f.data(), out_d.data(), static_cast<std::size_t>(S * H));
  INFO("out: " << a);
  CHECK(a.ok());
}

TEST_CASE("cuda local attention: errors name the problem", "[cuda][attention][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  cuda::DeviceArray<int> off(std::vector<int>{0, 4});
  cuda::DeviceArray<int> pos(std::vector<int>{0, 1, 2, 3});
  cuda::DeviceArray<float> x(4 * 200), out(4 * 200), table(64);
  cuda::LocalAttentionInputs in;
  in.batch = 1;
  in.capacity = 4;
  in.z = 129;
  in.h = 8;
  in.offsets = off.data();
  in.positions = pos.data();
  in.q = in.k = in.v = x.data();
  cuda::LocalAttentionConfig cfg;
  cfg.window = 2;
  cfg.max_positions = 8;
  CHECK_THROWS_WITH(cuda::local_attention_forward(cfg, in, table.data(), out.data(), nullptr),
                    Catch::Contains("Z = 129 is not supported on the device"));
  in.z = 8;
  cfg.window = 0;
  CHECK_THROWS_AS(cuda::local_attention_forward(cfg, in, table.data(), out.data(), nullptr), ValueError);
  cfg.window = 2;
  CHECK_THROWS_WITH(cuda::local_attention_forward(cfg, in, nullptr, out.data(), nullptr),
                    Catch::Contains("bias_table is nullptr but simple positions need 15 entries"));
  cfg.activation = cuda::Activation::softmax;
  CHECK_THROWS_WITH(cuda::local_attention_backward(cfg, in, table.data(), nullptr, nullptr, x.data(), x.data(),
                                                   x.data(), x.data(), table.data()),
                    Catch::Contains("needs the forward's out and row_stat"));
}

TEST_CASE("cuda local attention bf16: caller-written padded operands give the attention's own bits",
          "[cuda][attention][bf16][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const Direction C = Direction::causal, Bi = Direction::bidirectional;
  // Each case, then a smaller problem (fewer slots, same widths and configuration) on the same buffers.
  const auto smaller = [](Case c, std::vector<Index> lengths) {
    c.lengths = std::move(lengths);
    c.seed += 1000;
    return c;
  };
  std::vector<Case> cases = {
      {{90, 0, 13, 161}, 24, 36, 20, C, AA::relu2, PE::simple, 32, 0.85, 7, 301, true},
      {{90, 0, 13, 161}, 24, 36, 20, Bi, AA::softmax, PE::rotary, 32, 0.85, 70, 302, true},
      {{65, 64, 1, 200}, 64, 72, 16, C, AA::softmax, PE::rotary, 16, 0.6, 3, 303, true},
      {{50, 0, 77}, 10, 19, 7, C, AA::laplace, PE::local_simple, 16, 1.0, 1, 304, true},
      {{33, 17, 0, 90}, 7, 5, 5, Bi, AA::relu2, PE::none, 8, 1.0, 64, 305, true},  // odd widths
      {{300, 150}, 128, 256, 64, Bi, AA::laplace, PE::simple, 16, 1.0, 0, 306, true},
      {{20, 30, 9}, 4, 4, 600, C, AA::softmax, PE::none, 16, 0.15, 4, 307, true},  // W > capacity
      {{700, 0, 333}, 64, 96, 256, C, AA::relu2, PE::rotary, 16, 1.0, 900, 308, true},  // several chunks run
  };
  for (const Case& c : cases) {
    const Index S = std::accumulate(c.lengths.begin(), c.lengths.end(), Index{0});
    check_padded_case(c, smaller(c, {S / 3, 0, S / 5}));
  }
  // S = 0 (then a smaller S is S = 0 again), and a first call with S = 0 after nothing.
  check_padded_case({{0, 0}, 8, 8, 4, C, AA::softmax, PE::simple, 8, 1.0, 70, 309, true},
                    {{0, 0}, 8, 8, 4, C, AA::softmax, PE::simple, 8, 1.0, 70, 310, true});
  check_padded_case({{40, 25}, 8, 8, 4, Bi, AA::relu2, PE::rotary, 8, 1.0, 7, 311, true},
                    {{0, 0}, 8, 8, 4, Bi, AA::relu2, PE::rotary, 8, 1.0, 70, 312, true});
  // Full products (every block runs, so the tails reach the last row).
  cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::full);
  check_padded_case(cases[1], smaller(cases[1], {40, 0, 2}));
  cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::graph);
}

TEST_CASE("cuda local attention: padded operands are checked", "[cuda][attention][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  cuda::DeviceArray<int> off(std::vector<int>{0, 4});
  cuda::DeviceArray<int> pos(std::vector<int>{0, 1, 2, 3});
  cuda::DeviceArray<float> x(4 * 8), out(4 * 8), table(64);
  cuda::LocalAttentionConfig cfg;
  cfg.window = 2;
  cfg.max_positions = 8;
  const cuda::PaddedLayout lay = cuda::local_attention_padded_layout(cfg, 4);
  CHECK(lay.offset == 64);
  CHECK(lay.rows == 64 + 2 * 64);
  CHECK(cuda::local_attention_padded_layout(cfg, 0).rows == 0);
  cuda::DeviceArray<std::uint16_t> qp(static_cast<std::size_t>(lay.rows * 8));
  cuda::LocalAttentionInputs in;
  in.batch = 1;
  in.capacity = 4;
  in.z = in.h = 8;
  in.offsets = off.data();
  in.positions = pos.data();
  in.q_padded = qp.data();
  in.k = in.v = x.data();
  CHECK_THROWS_WITH(cuda::local_attention_forward(cfg, in, table.data(), out.data(), nullptr),
                    Catch::Contains("need cfg.bf16"));
  cfg.bf16 = true;
  in.k = nullptr;
  CHECK_THROWS_WITH(cuda::local_attention_forward(cfg, in, table.data(), out.data(), nullptr),
                    Catch::Contains("q, k or v is nullptr"));
  in.k = x.data();
  in.q_padded = static_cast<std::uint16_t*>(qp.data()) + 1;
  CHECK_THROWS_WITH(cuda::local_attention_forward(cfg, in, table.data(), out.data(), nullptr),
                    Catch::Contains("16-byte aligned"));
  in.q_padded = qp.data();
  in.dout_padded = qp.data();
  cfg.activation = cuda::Activation::softmax;
  CHECK_THROWS_WITH(cuda::local_attention_backward(cfg, in, table.data(), out.data(), x.data(), nullptr, x.data(),
                                                   x.data(), x.data(), table.data()),
                    Catch::Contains("needs the fp32 dout"));
  CHECK_THROWS_WITH(cuda::local_attention_pad_bf16(cfg, in, cuda::PaddedOperand::q, x.data(),
                                                   static_cast<std::uint16_t*>(qp.data()) + 1),
                    Catch::Contains("16-byte aligned"));
}

// Tagged [oom]: compute-sanitizer reports the deliberate failed cudaMalloc as an API error, so the memcheck run
// leaves this case out (tests/cuda/run_device_all.sh).
TEST_CASE("cuda errors: a failed CUDA call becomes CudaError naming the call", "[cuda][quick][oom]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  try {
    cuda::DeviceBuffer huge(std::size_t(1) << 52);
    FAIL("allocating 4 PiB succeeded");
  } catch (const cuda::CudaError& e) {
    CHECK(e.call().find("cudaMalloc") != std::string::npos);
    CHECK(std::string(e.what()).find("cudaErrorMemoryAllocation") != std::string::npos);
  }
}

TEST_CASE("cuda local attention: small cases for the race checker", "[cuda][attention][race]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_case({{70, 0, 9}, 8, 12, 6, Direction::causal, AA::relu2, PE::simple, 8, 0.8, 3, 31});
  check_case({{66, 5}, 12, 20, 4, Direction::bidirectional, AA::softmax, PE::local_simple, 8, 1.0, 60, 32});
}

TEST_CASE("cuda local attention bf16: small cases for the race checker", "[cuda][attention][race][bf16]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_case(as_bf16({{70, 0, 9}, 8, 12, 6, Direction::causal, AA::relu2, PE::simple, 8, 0.8, 3, 31}));
  check_case(as_bf16({{66, 5}, 12, 20, 4, Direction::bidirectional, AA::softmax, PE::local_simple, 8, 1.0, 60, 32}));
}
