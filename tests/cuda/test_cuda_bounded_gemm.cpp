// sma::cuda::bounded_gemm against a plain product in double on the host: rows, reduction and batch bounds, bf16
// and fp32, S = 0, S = M_max, S off the chunk grid; the rows of skipped chunks untouched; one graph reused while S
// changes on the device, a new one when a pointer changes; full mode equal to graph mode; errors.
#include "cuda_test_support.hpp"

#include <sma/cuda/bounded_gemm.hpp>

#include <cstdint>
#include <random>
#include <vector>

using namespace sma;

namespace {

std::uint16_t to_bf16_bits(float x) {  // round to nearest even (no NaN in the test data)
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

float from_bf16_bits(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// A row-major host matrix with its device copy in the product's element type; `value` holds what the device
/// sees (rounded to bf16 for bf16), so the double reference uses exactly the device's operands.
struct Operand {
  int rows = 0, cols = 0;
  std::vector<float> value;
  cuda::DeviceArray<float> f32;
  cuda::DeviceArray<std::uint16_t> b16;
  const void* ptr(cuda::GemmType t) const {
    return t == cuda::GemmType::bf16 ? static_cast<const void*>(b16.data()) : static_cast<const void*>(f32.data());
  }
  float at(int r, int c) const { return value[static_cast<std::size_t>(r) * cols + c]; }
};

/// rows x cols uniform(-1, 1); rows >= zero_from are zero (operands past S in a reduction).
Operand make_operand(int rows, int cols, cuda::GemmType t, unsigned seed, int zero_from = 1 << 30) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Operand o;
  o.rows = rows;
  o.cols = cols;
  o.value.resize(static_cast<std::size_t>(rows) * cols);
  std::vector<std::uint16_t> bits(o.value.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const std::size_t i = static_cast<std::size_t>(r) * cols + c;
      const float x = r >= zero_from ? 0.f : u(rng);
      bits[i] = to_bf16_bits(x);
      o.value[i] = t == cuda::GemmType::bf16 ? from_bf16_bits(bits[i]) : x;
    }
  if (t == cuda::GemmType::bf16) o.b16 = cuda::DeviceArray<std::uint16_t>(bits);
  else o.f32 = cuda::DeviceArray<float>(o.value);
  return o;
}

/// Reference entry (i, j) of entry t of alpha op(A) op(B) + beta c0 in double, for the rows [k0, k1) of the reduction.
double reference(const cuda::BoundedGemm& g, const Operand& A, const Operand& B, int t, int i, int j, int k1,
                 double c0) {
  double s = 0;
  for (int k = 0; k < k1; ++k) {
    const long long ra = g.trans_a ? k : i, ca = g.trans_a ? i : k;
    const long long rb = g.trans_b ? j : k, cb = g.trans_b ? k : j;
    const double a = A.value[static_cast<std::size_t>(t * g.stride_a + ra * g.lda + ca)];
    const double b = B.value[static_cast<std::size_t>(t * g.stride_b + rb * g.ldb + cb)];
    s += a * b;
  }
  return g.alpha * s + (g.beta == 0.f ? 0.0 : g.beta * c0);
}

// Sums of up to K products of |x| <= 1 in fp32: a few K * 2^-24 relative; 1e-4 absolute has ample margin at K <= 300.
constexpr double kTol = 1e-4;

cuda::BoundedGemm rows_product(cuda::GemmType t, bool ta, bool tb, int M, int N, int K, const Operand& A,
                               const Operand& B, float* C) {
  cuda::BoundedGemm g;
  g.type = t;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = M;
  g.n = N;
  g.k = K;
  g.alpha = 0.5f;
  g.a = A.ptr(t);
  g.lda = A.cols;
  g.b = B.ptr(t);
  g.ldb = B.cols;
  g.c = C;
  g.ldc = N;
  g.bound = cuda::GemmBound::rows;
  return g;
}

void check_rows_bound(cuda::GemmType t, bool ta, bool tb) {
  INFO("type " << (t == cuda::GemmType::bf16 ? "bf16" : "fp32") << " trans_a " << ta << " trans_b " << tb);
  const int M = 1000, N = 48, K = 40, chunk = 128;
  const Operand A = ta ? make_operand(K, M, t, 1) : make_operand(M, K, t, 1);
  const Operand B = tb ? make_operand(N, K, t, 2) : make_operand(K, N, t, 2);
  const float sen = cuda_test::sentinel();
  cuda::DeviceArray<float> C(static_cast<std::size_t>(M) * N);
  cuda::DeviceArray<int> count(std::vector<int>{0});
  cuda::BoundedGemm g = rows_product(t, ta, tb, M, N, K, A, B, C.data());
  g.chunk = chunk;
  cuda::Stream stream;
  const long long builds0 = cuda::bounded_gemm_stats().builds;
  for (int S : {0, M, 300, 128, 1, 999}) {
    INFO("S " << S);
    C.upload(std::vector<float>(static_cast<std::size_t>(M) * N, sen));
    count.upload(std::vector<int>{S});
    cuda::bounded_gemm(g, count.data(), stream.handle());
    stream.synchronize();
    // One graph for all S: built by the first call only.
    CHECK(cuda::bounded_gemm_stats().builds == builds0 + 1);
    const std::vector<float> c = C.download();
    const int covered = (S + chunk - 1) / chunk * chunk;
    double err = 0;
    bool untouched = true;
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        const float x = c[static_cast<std::size_t>(i) * N + j];
        if (i < S) err = std::max(err, std::abs(x - reference(g, A, B, 0, i, j, K, 0)));
        else if (i >= covered && std::memcmp(&x, &sen, sizeof x) != 0) untouched = false;
      }
    CHECK(err <= kTol);
    CHECK(untouched);
  }
}

}  // namespace

TEST_CASE("cuda bounded_gemm: rows bound, bf16 and fp32, every transpose", "[cuda][bounded_gemm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (cuda::GemmType t : {cuda::GemmType::bf16, cuda::GemmType::fp32})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_rows_bound(t, ta, tb);
}

TEST_CASE("cuda bounded_gemm: reduction bound accumulates chunk by chunk (dW += A^T B)",
          "[cuda][bounded_gemm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const int Kmax = 700, P = 24, D = 36, chunk = 64;
  cuda::Stream stream;
  for (cuda::GemmType t : {cuda::GemmType::bf16, cuda::GemmType::fp32})
    for (float beta : {1.f, 0.f})
      for (int S : {0, 700, 333, 64}) {
        INFO("type " << static_cast<int>(t) << " beta " << beta << " S " << S);
        // A (Kmax x P), B (Kmax x D), rows past S zero (the contract); C (P x D) = A^T B + beta C0.
        const Operand A = make_operand(Kmax, P, t, 3, S), B = make_operand(Kmax, D, t, 4, S);
        std::vector<float> c0(static_cast<std::size_t>(P) * D);
        for (std::size_t i = 0; i < c0.size(); ++i) c0[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
        cuda::DeviceArray<float> C(c0);
        cuda::DeviceArray<int> count(std::vector<int>{S});
        cuda::BoundedGemm g;
        g.type = t;
        g.trans_a = true;
        g.m = P;
        g.n = D;
        g.k = Kmax;
        g.beta = beta;
        g.a = A.ptr(t);
        g.lda = P;
        g.b = B.ptr(t);
        g.ldb = D;
        g.c = C.data();
        g.ldc = D;
        g.bound = cuda::GemmBound::reduction;
        g.chunk = chunk;
        cuda::bounded_gemm(g, count.data(), stream.handle());
        stream.synchronize();
        const std::vector<float> c = C.download();
        double err = 0;
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < D; ++j)
            err = std::max(err, std::abs(c[static_cast<std::size_t>(i) * D + j] -
                                         reference(g, A, B, 0, i, j, S, c0[static_cast<std::size_t>(i) * D + j])));
        CHECK(err <= 3 * kTol);
      }
}

TEST_CASE("cuda bounded_gemm: batch bound with rows per entry, and a second product after the first",
          "[cuda][bounded_gemm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  // 13 full entries of 64 rows (C row r = entry r / 64) and a tail product of 20 rows starting at row 832, as
  // the attention's band products: S counts rows.
  const int E = 13, R = 64, tail = 20, N = 32, K = 48, rows = E * R + tail;
  const cuda::GemmType t = cuda::GemmType::bf16;
  const Operand A = make_operand(rows, K, t, 5);
  const Operand B = make_operand(E + 1, K * N, t, 6);  // entry e: K x N at e * K * N
  const float sen = cuda_test::sentinel();
  cuda::DeviceArray<float> C(static_cast<std::size_t>(rows) * N);
  cuda::DeviceArray<int> count(std::vector<int>{0});
  cuda::BoundedGemm g[2];
  g[0].type = t;
  g[0].m = R;
  g[0].n = N;
  g[0].k = K;
  g[0].a = A.ptr(t);
  g[0].lda = K;
  g[0].stride_a = static_cast<long long>(R) * K;
  g[0].b = B.ptr(t);
  g[0].ldb = N;
  g[0].stride_b = static_cast<long long>(K) * N;
  g[0].c = C.data();
  g[0].ldc = N;
  g[0].stride_c = static_cast<long long>(R) * N;
  g[0].batch = E;
  g[0].bound = cuda::GemmBound::batch;
  g[0].chunk = 3;
  g[0].rows_per_entry = R;
  g[1] = g[0];
  g[1].m = tail;
  g[1].batch = 1;
  g[1].chunk = 1;
  g[1].a = static_cast<const std::uint16_t*>(A.ptr(t)) + static_cast<long long>(E) * R * K;
  g[1].b = static_cast<const std::uint16_t*>(B.ptr(t)) + static_cast<long long>(E) * K * N;
  g[1].c = C.data() + static_cast<long long>(E) * R * N;
  g[1].first_row = static_cast<long long>(E) * R;
  cuda::Stream stream;
  for (int S : {0, rows, 833, 832, 200, 192}) {
    INFO("S " << S);
    C.upload(std::vector<float>(static_cast<std::size_t>(rows) * N, sen));
    count.upload(std::vector<int>{S});
    cuda::bounded_gemm(g, 2, count.data(), stream.handle());
    stream.synchronize();
    const std::vector<float> c = C.download();
    // Chunks of 3 entries = 192 rows; the tail runs when S > 832.
    const int covered = S > E * R ? rows : std::min(E * R, (S + 3 * R - 1) / (3 * R) * (3 * R));
    double err = 0;
    bool untouched = true;
    for (int r = 0; r < rows; ++r) {
      const int e = std::min(r / R, E);
      for (int j = 0; j < N; ++j) {
        const float x = c[static_cast<std::size_t>(r) * N + j];
        if (r < S) {
          double s = 0;
          for (int k = 0; k < K; ++k)
            s += static_cast<double>(A.at(r, k)) * B.value[static_cast<std::size_t>(e) * K * N + k * N + j];
          err = std::max(err, std::abs(x - s));
        } else if (r >= covered && std::memcmp(&x, &sen, sizeof x) != 0) {
          untouched = false;
        }
      }
    }
    CHECK(err <= kTol);
    CHECK(untouched);
  }
}

TEST_CASE("cuda bounded_gemm: cached graphs, rebuilt when a pointer changes; full mode agrees",
          "[cuda][bounded_gemm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const cuda::GemmType t = cuda::GemmType::fp32;
  const int M = 500, N = 40, K = 24;
  const Operand A = make_operand(M, K, t, 7), B = make_operand(K, N, t, 8);
  cuda::DeviceArray<float> C1(static_cast<std::size_t>(M) * N), C2(static_cast<std::size_t>(M) * N);
  cuda::DeviceArray<int> count(std::vector<int>{M});
  cuda::Stream stream;
  cuda::BoundedGemm g = rows_product(t, false, false, M, N, K, A, B, C1.data());
  const cuda::BoundedGemmStats s0 = cuda::bounded_gemm_stats();
  for (int r = 0; r < 3; ++r) cuda::bounded_gemm(g, count.data(), stream.handle());
  const cuda::BoundedGemmStats s1 = cuda::bounded_gemm_stats();
  CHECK(s1.builds == s0.builds + 1);
  CHECK(s1.launches == s0.launches + 3);
  g.c = C2.data();  // a new pointer: a new graph
  cuda::bounded_gemm(g, count.data(), stream.handle());
  const cuda::BoundedGemmStats s2 = cuda::bounded_gemm_stats();
  CHECK(s2.builds == s1.builds + 1);
  CHECK(s2.cached == s1.cached + 1);
  g.c = C1.data();  // back to the first: cached
  cuda::bounded_gemm(g, count.data(), stream.handle());
  CHECK(cuda::bounded_gemm_stats().builds == s2.builds);
  stream.synchronize();
  const std::vector<float> graph = C1.download();
  CHECK(cuda_test::bitwise_equal(graph, C2.download()));
  cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::full);
  C1.fill_bytes(0);
  cuda::bounded_gemm(g, count.data(), stream.handle());
  stream.synchronize();
  cuda::set_bounded_gemm_mode(cuda::BoundedGemmMode::graph);
  const std::vector<float> full = C1.download();
  CHECK(cuda_test::max_abs_diff(graph.data(), full.data(), graph.size()) <= kTol);
  CHECK(cuda_test::max_abs(full.data(), full.size()) > 0.1);  // not vacuous
  if (cuda::bounded_gemm_stats().child_graphs > 0)
    WARN(cuda::bounded_gemm_stats().child_graphs << " chunks were captured as child graphs");
  cuda::clear_bounded_gemm_cache();
  CHECK(cuda::bounded_gemm_stats().cached == 0);
}

TEST_CASE("cuda bounded_gemm: errors name the problem", "[cuda][bounded_gemm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const cuda::GemmType t = cuda::GemmType::fp32;
  const Operand A = make_operand(100, 8, t, 9), B = make_operand(8, 8, t, 10);
  cuda::DeviceArray<float> C(800);
  cuda::DeviceArray<int> count(std::vector<int>{50});
  const cuda::BoundedGemm good = rows_product(t, false, false, 100, 8, 8, A, B, C.data());
  const auto message = [&](cuda::BoundedGemm g, const int* n) {
    try {
      cuda::bounded_gemm(g, n, nullptr);
    } catch (const ValueError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  cuda::BoundedGemm g = good;
  g.lda = 4;
  CHECK(message(g, count.data()).find("leading dimension") != std::string::npos);
  g = good;
  g.c = nullptr;
  CHECK(message(g, count.data()).find("nullptr") != std::string::npos);
  g = good;
  g.chunk = 1;  // 100 chunks
  CHECK(message(g, count.data()).find("chunks in one call") != std::string::npos);
  g = good;
  g.m = -1;
  CHECK(message(g, count.data()).find("negative size") != std::string::npos);
  CHECK(message(good, nullptr).find("count") != std::string::npos);
  CHECK(message(good, count.data()) == "no error");
  cuda::device_synchronize();
}
