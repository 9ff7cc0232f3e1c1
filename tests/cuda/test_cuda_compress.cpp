// sma::cuda::plan_compression / compress / compress_backward / extract_add / extract_backward against the CPU
// versions in sma/ops/compress.hpp: both routing semantics, an all-off row, a fully active row (the reference's
// uncompressed fallback), nothing active (S = 0), rows longer than one scan tile and more rows than one block.
#include "cuda_test_support.hpp"

#include <sma/cuda/compress.hpp>
#include <sma/ops/compress.hpp>

#include <random>
#include <vector>

using namespace sma;

namespace {

struct MaskCase {
  int B, L;
  int percent;        // activation probability
  int full_row = -1;  // this row fully active
  int empty_row = -1; // this row all off
  unsigned seed = 1;
};

void check_mask(const MaskCase& mc, RoutingSemantics sem) {
  INFO("B=" << mc.B << " L=" << mc.L << " p=" << mc.percent << "% full_row=" << mc.full_row
            << " semantics=" << (sem == RoutingSemantics::reference ? "reference" : "per_row"));
  std::mt19937 rng(mc.seed);
  std::uniform_int_distribution<int> pct(0, 99);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int B = mc.B, L = mc.L, D = 13;
  Tensor2<std::uint8_t> active(B, L);
  std::vector<std::uint8_t> flat(static_cast<std::size_t>(B) * L);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < L; ++t) {
      bool on = pct(rng) < mc.percent;
      if (b == mc.full_row) on = true;
      if (b == mc.empty_row) on = false;
      active(b, t) = on ? 1 : 0;
      flat[static_cast<std::size_t>(b) * L + t] = on ? 1 : 0;
    }
  const Compression cpu = plan_compression(active, sem);

  cuda::Stream stream;
  cuda::DeviceArray<std::uint8_t> d_active(flat);
  cuda::DeviceCompression plan(B, L);
  cuda::plan_compression(d_active.data(), sem == RoutingSemantics::per_row ? cuda::CompressionSemantics::per_row
                                                                            : cuda::CompressionSemantics::reference,
                         plan.view(), stream.handle());
  stream.synchronize();
  const std::vector<int> off = plan.offsets();
  const int S = off.back();
  REQUIRE(S == cpu.slots());
  CHECK(plan.compressed() == cpu.compressed);
  for (int b = 0; b <= B; ++b) CHECK(off[b] == cpu.offsets[b]);
  const std::vector<int> na = plan.num_active();
  for (int b = 0; b < B; ++b) CHECK(na[b] == cpu.num_active[b]);
  const std::vector<int> tok = plan.token(), pos = plan.positions();
  const std::vector<std::uint8_t> kv = plan.key_valid();
  int bad = 0;
  for (int s = 0; s < S; ++s)
    bad += tok[s] != cpu.token[s] || pos[s] != cpu.positions[s] || kv[s] != cpu.key_valid[s];
  CHECK(bad == 0);
  // The token -> slot map is the inverse of token[] on [0, S) and -1 for tokens without a slot.
  const std::vector<int> slot = plan.slot();
  std::vector<int> want(static_cast<std::size_t>(B) * L, -1);
  for (int s = 0; s < S; ++s) want[static_cast<std::size_t>(cpu.token[s])] = s;
  CHECK(slot == want);

  // Data movers. x, gate and dout over all B*L tokens; compressed tensors are allocated for the B*L bound.
  const int N = B * L;
  Matrix<float> x(N, D), dout(N, D), hc(std::max(S, 0), D);
  std::vector<float> gate(static_cast<std::size_t>(N));
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = u(rng);
  for (Index i = 0; i < dout.size(); ++i) dout.data()[i] = u(rng);
  for (Index i = 0; i < hc.size(); ++i) hc.data()[i] = u(rng);
  for (float& g : gate) g = u(rng);
  const Matrix<float> xc = compress<float>(CMatrixMap<float>(x.data(), N, D), cpu);
  Matrix<float> dx = Matrix<float>::Constant(N, D, 0.5f), out = dout;
  compress_backward<float>(CMatrixMap<float>(hc.data(), S, D), cpu, MatrixMap<float>(dx.data(), N, D));
  extract_add<float>(CMatrixMap<float>(hc.data(), S, D), cpu, gate.data(), MatrixMap<float>(out.data(), N, D));
  Matrix<float> dhc;
  std::vector<float> dgate(static_cast<std::size_t>(N), 7.f);
  extract_backward<float>(CMatrixMap<float>(hc.data(), S, D), cpu, gate.data(), CMatrixMap<float>(dout.data(), N, D),
                          dhc, dgate.data());

  const auto vec = [](const Matrix<float>& m) { return std::vector<float>(m.data(), m.data() + m.size()); };
  const Matrix<float> dx0 = Matrix<float>::Constant(N, D, 0.5f);
  std::vector<float> hc_cap(static_cast<std::size_t>(N) * D, std::numeric_limits<float>::quiet_NaN());
  std::copy(hc.data(), hc.data() + hc.size(), hc_cap.begin());
  cuda::DeviceArray<float> d_x(vec(x)), d_dout(vec(dout)), d_gate(gate), d_hc(hc_cap);
  cuda::DeviceArray<float> d_xc(static_cast<std::size_t>(N) * D), d_dx(vec(dx0)), d_out(vec(dout)),
      d_dhc(static_cast<std::size_t>(N) * D), d_dgate(std::vector<float>(static_cast<std::size_t>(N), 7.f));
  const auto v = plan.view();
  cuda::compress(d_x.data(), D, v, d_xc.data(), stream.handle());
  cuda::compress_backward(d_hc.data(), D, v, d_dx.data(), stream.handle());
  cuda::extract_add(d_hc.data(), D, v, d_gate.data(), d_out.data(), stream.handle());
  cuda::extract_backward(d_hc.data(), D, v, d_gate.data(), d_dout.data(), d_dhc.data(), d_dgate.data(),
                         stream.handle());
  stream.synchronize();
  const std::size_t n = static_cast<std::size_t>(S) * D;
  const std::vector<float> g_xc = d_xc.download(), g_dx = d_dx.download(), g_out = d_out.download(),
                           g_dhc = d_dhc.download(), g_dgate = d_dgate.download();
  CHECK(cuda_test::max_abs_diff(g_xc.data(), xc.data(), n) == 0.0);     // a gather is exact
  CHECK(cuda_test::max_abs_diff(g_dx.data(), dx.data(), dx.size()) == 0.0);  // one addition per element
  CHECK(cuda_test::max_abs_diff(g_out.data(), out.data(), out.size()) <= 1e-6);  // gate*hc may be fused on the device
  CHECK(cuda_test::max_abs_diff(g_dhc.data(), dhc.data(), n) == 0.0);
  CHECK(cuda_test::max_abs_diff(g_dgate.data(), dgate.data(), dgate.size()) <= 1e-5);
}

}  // namespace

TEST_CASE("cuda plan_compression and the data movers match the CPU", "[cuda][compress][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::vector<MaskCase> cases = {
      {5, 37, 40, -1, 1, 1},      // ragged, one empty row
      {3, 1000, 20, -1, -1, 2},   // rows longer than one 256-token scan tile
      {300, 9, 50, -1, 4, 3},     // more rows than one 256-thread block scans at once
      {4, 64, 30, 2, -1, 4},      // a fully active row: the reference runs uncompressed
      {6, 50, 0, -1, -1, 5},      // nothing active: S = 0
      {2, 513, 100, -1, -1, 6},   // everything active
  };
  for (const MaskCase& mc : cases)
    for (RoutingSemantics sem : {RoutingSemantics::reference, RoutingSemantics::per_row}) check_mask(mc, sem);
}

TEST_CASE("cuda compress: bad arguments are reported", "[cuda][compress][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  cuda::DeviceCompression plan(2, 3);
  CHECK_THROWS_AS(cuda::compress(nullptr, 4, plan.view(), nullptr), ValueError);
  CHECK_THROWS_AS(cuda::DeviceCompression(-1, 3), ValueError);
  cuda::CompressionView v = plan.view();
  v.offsets = nullptr;
  CHECK_THROWS_WITH(cuda::plan_compression(nullptr, cuda::CompressionSemantics::per_row, v),
                    Catch::Contains("null device pointer"));
}
