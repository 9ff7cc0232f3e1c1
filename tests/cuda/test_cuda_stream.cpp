// SeqBoatLayerStreamerDevice against the CPU's SeqBoatLayerStreamer<float> token by token (and so against the full
// causal forward under per_row routing, also compared), B = 3 streams routed very differently (stream_setup.hpp:
// one never activated, one always, one at random), windows shorter than the activated count; relu2 / softmax /
// laplace, none / simple / local_simple / rotary, pre- and post-norm (layernorm, rmsnorm, batchnorm in eval), EMA
// truncation. Also: the CUDA graph against the plain launches, reset of one row, the state's round trips (device ->
// host -> device, CPU state -> device), the router shift changed between graph replays, and the error cases.
#include "cuda_test_support.hpp"
#include "stream_setup.hpp"

#include <sma/cuda/buffer.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_stream.hpp>
#include <sma/models/seqboat_stream.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

using namespace sma;
using AA = ops::AttentionActivation;
using PE = ops::PositionEncoding;
using stream_test::StreamCase;

namespace {

std::vector<float> row_slice(const Tensor3<float>& x, Index t) {  // (B, L, D) -> B*D values at position t
  const Index B = x.dimension(0), D = x.dimension(2);
  std::vector<float> v(static_cast<std::size_t>(B * D));
  for (Index b = 0; b < B; ++b)
    for (Index d = 0; d < D; ++d) v[static_cast<std::size_t>(b * D + d)] = x(b, t, d);
  return v;
}

Tensor2<float> as_tensor(const std::vector<float>& v, Index B, Index D) {
  Tensor2<float> t(B, D);
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

/// max |a - b| / max(max |b|, 1e-3).
double rel(const float* a, const float* b, std::size_t n) {
  return cuda_test::max_abs_diff(a, b, n) / std::max(cuda_test::max_abs(b, n), 1e-3);
}

constexpr double kTol = 2e-5;  // float against float: the host emulation measured <= 2.1e-7

struct Fixture {
  SeqBoatLayer<float> cpu;
  cuda::SeqBoatLayerDevice dev;
  Tensor3<float> x;
  Fixture(const StreamCase& k, Index B, Index L)
      : cpu(stream_test::stream_config(k), k.seed), dev(make(cpu, k)), x(stream_test::steered_input<float>(
                                                                            B, L, cpu.config().embed_dim, k.seed + 1)) {}
  static cuda::SeqBoatLayerDevice make(SeqBoatLayer<float>& l, const StreamCase& k) {
    stream_test::steer_router(l, k.seed);
    return cuda::SeqBoatLayerDevice::from_cpu(l);
  }
};

void check_case(const StreamCase& k) {
  INFO("case " << k.name);
  const Index B = 3, L = 50;
  Fixture f(k, B, L);
  const Index D = f.cpu.config().embed_dim, W = k.window;
  SeqBoatLayerStreamer<float> cpu(f.cpu);
  auto cst = cpu.make_state(B);
  cuda::SeqBoatLayerStreamerDevice dev(f.dev, static_cast<int>(B));
  Tensor3<float> ys(B, L, D);
  std::vector<std::vector<float>> plain;
  double worst = 0;
  for (Index t = 0; t < L; ++t) {
    const std::vector<float> xt = row_slice(f.x, t);
    StreamTrace trace;
    const Tensor2<float> want = cpu.step(as_tensor(xt, B, D), cst, &trace);
    const std::vector<float> got = dev.step(xt);
    worst = std::max(worst, rel(got.data(), want.data(), got.size()));
    for (Index b = 0; b < B; ++b)
      for (Index d = 0; d < D; ++d) ys(b, t, d) = got[static_cast<std::size_t>(b * D + d)];
    plain.push_back(got);
    if (t % 7 == 0 || t == L - 1) {
      const auto st = dev.download();
      for (Index b = 0; b < B; ++b) REQUIRE(st.last_active[b] == trace.active(b, 0));
    }
  }
  INFO("max relative error against the CPU streamer " << worst);
  CHECK(worst < kTol);

  // The routing the setup asks for: a row never routed, one always (more tokens than the window), one mixed.
  const auto st = dev.state();
  REQUIRE(st.activated[0] == 0);
  REQUIRE(st.activated[1] == L);
  REQUIRE(st.activated[2] > 0);
  REQUIRE(st.activated[2] < L);
  REQUIRE(L > W);
  for (Index b = 0; b < B; ++b) {
    const auto i = static_cast<std::size_t>(b);
    CHECK(st.position[i] == cst.position[i]);
    CHECK(st.activated[i] == cst.activated[i]);
    CHECK(st.last_active[i] == cst.last_active[i]);
    CHECK(std::abs(st.last_gate[i] - cst.last_gate[i]) < 1e-5);
    const Index n = cst.memory_size(b), Z = st.keys.dimension(2), H = st.values.dimension(2);
    for (Index j = 0; j < n; ++j) CHECK(st.key_positions(b, j) == cst.key_positions(b, j));
    CHECK(rel(st.keys.data() + b * W * Z, cst.keys.data() + b * W * Z, static_cast<std::size_t>(n * Z)) < kTol);
    CHECK(rel(st.values.data() + b * W * H, cst.values.data() + b * W * H, static_cast<std::size_t>(n * H)) < kTol);
  }
  CHECK(rel(st.ema.data(), cst.ema.data(), static_cast<std::size_t>(st.ema.size())) < kTol);
  CHECK(rel(st.ema_history.data(), cst.ema_history.data(), static_cast<std::size_t>(st.ema_history.size())) < kTol);

  // The full causal forward under per_row routing, on the whole sequences.
  Context ctx(Mode::eval);
  typename SeqBoatLayer<float>::Cache cache;
  const Tensor3<float> full = f.cpu.forward(ctx, f.x, cache);
  const double err_full = rel(ys.data(), full.data(), static_cast<std::size_t>(full.size()));
  INFO("max relative error against the full forward " << err_full);
  CHECK(err_full < 1e-4);

  // The same steps replayed as a CUDA graph from fixed device buffers.
  cuda::Stream s;  // non-blocking: everything below is queued on it
  dev.reset(s.handle());
  dev.set_graph(true);
  cuda::DeviceArray<float> xd(static_cast<std::size_t>(B * D)), yd(static_cast<std::size_t>(B * D));
  double worst_graph = 0;
  for (Index t = 0; t < L; ++t) {
    xd.upload(row_slice(f.x, t), s.handle());
    dev.step(xd.data(), yd.data(), s.handle());
    const std::vector<float> got = yd.download(s.handle());
    worst_graph = std::max(worst_graph, rel(got.data(), plain[static_cast<std::size_t>(t)].data(), got.size()));
  }
  INFO("graph against plain launches " << worst_graph);
  CHECK(worst_graph <= 1e-6);
  CHECK(dev.state(s.handle()).activated == st.activated);
}

const StreamCase kCases[] = {
    {"relu2 simple prenorm layernorm W4", AA::relu2, PE::simple, 4, 0, true, NormType::layernorm, 3},
    {"softmax rotary postnorm rmsnorm W5 K6", AA::softmax, PE::rotary, 5, 6, false, NormType::rmsnorm, 5},
    {"laplace local_simple prenorm rmsnorm W3", AA::laplace, PE::local_simple, 3, 0, true, NormType::rmsnorm, 7},
    {"softmax none postnorm batchnorm W40", AA::softmax, PE::none, 40, 0, false, NormType::batchnorm, 9},
    {"relu2 rotary prenorm layernorm W7 K3", AA::relu2, PE::rotary, 7, 3, true, NormType::layernorm, 13},
    {"softmax simple prenorm batchnorm W6", AA::softmax, PE::simple, 6, 0, true, NormType::batchnorm, 17},
};

}  // namespace

TEST_CASE("device streamer equals the CPU streamer step by step", "[cuda][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (const StreamCase& k : kCases) check_case(k);
}

TEST_CASE("device streamer: reset of one row, state round trips", "[cuda][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const StreamCase k = kCases[1];
  const Index B = 3, L = 40;
  Fixture f(k, B, L);
  const Index D = f.cpu.config().embed_dim;
  SeqBoatLayerStreamer<float> cpu(f.cpu);
  auto cst = cpu.make_state(B);
  cuda::SeqBoatLayerStreamerDevice dev(f.dev, static_cast<int>(B));
  cuda::SeqBoatLayerStreamerDevice twin(f.dev, static_cast<int>(B));
  double worst = 0;
  for (Index t = 0; t < L; ++t) {
    if (t == 15) {  // stream 2 starts over; the others go on
      cst.reset_row(2);
      dev.reset_row(2);
      const auto st = dev.state();
      CHECK(st.position[2] == 0);
      CHECK(st.activated[2] == 0);
      CHECK(st.position[1] == 15);
    }
    if (t == 25) {
      // A copy of the device state into a second streamer continues bit for bit; the CPU state uploaded gives
      // the CPU's numbers.
      twin.upload(dev.download());
    }
    const std::vector<float> xt = row_slice(f.x, t);
    const Tensor2<float> want = cpu.step(as_tensor(xt, B, D), cst);
    const std::vector<float> got = dev.step(xt);
    worst = std::max(worst, rel(got.data(), want.data(), got.size()));
    if (t >= 25) CHECK(cuda_test::bitwise_equal(twin.step(xt), got));
  }
  INFO("max relative error " << worst);
  CHECK(worst < kTol);

  cuda::SeqBoatLayerStreamerDevice from_cpu(f.dev, static_cast<int>(B));
  from_cpu.set_state(cst);
  const std::vector<float> xt = row_slice(f.x, 0);
  const Tensor2<float> want = cpu.step(as_tensor(xt, B, D), cst);
  const std::vector<float> got = from_cpu.step(xt);
  CHECK(rel(got.data(), want.data(), got.size()) < kTol);
}

TEST_CASE("device streamer: the router shift changed between graph replays", "[cuda][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const StreamCase k = kCases[0];
  Fixture f(k, 3, 4);
  cuda::SeqBoatLayerStreamerDevice dev(f.dev, 3);
  dev.set_graph(true);
  cuda::DeviceArray<float> xd(row_slice(f.x, 0)), yd(xd.size());
  f.dev.set_router_shift(100.f);  // every token routed
  dev.step(xd.data(), yd.data());
  CHECK(dev.download().last_active == std::vector<std::uint8_t>{1, 1, 1});
  f.dev.set_router_shift(-100.f);  // none
  dev.step(xd.data(), yd.data());
  const auto st = dev.download();
  CHECK(st.last_active == std::vector<std::uint8_t>{0, 0, 0});
  CHECK(st.activated == std::vector<std::int64_t>{1, 1, 1});
  CHECK(st.position == std::vector<std::int64_t>{2, 2, 2});
  CHECK(cuda_test::all_finite(yd.download(), yd.size()));
}

TEST_CASE("device streamer: errors", "[cuda][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const StreamCase k = kCases[0];
  Fixture f(k, 3, 4);
  CHECK_THROWS_AS(cuda::SeqBoatLayerStreamerDevice(f.dev, 0), ValueError);
  CHECK_THROWS_AS(cuda::SeqBoatLayerStreamerDevice(f.dev, 70000), ValueError);
  SeqBoatLayerConfig bc = stream_test::stream_config(k);
  bc.direction = Direction::bidirectional;
  SeqBoatLayer<float> bidir(bc, 1);
  const auto bdev = cuda::SeqBoatLayerDevice::from_cpu(bidir);
  CHECK_THROWS_WITH(cuda::SeqBoatLayerStreamerDevice(bdev, 2), Catch::Contains("causal"));

  cuda::SeqBoatLayerStreamerDevice dev(f.dev, 3);
  CHECK_THROWS_AS(dev.step(std::vector<float>(5)), ShapeError);  // x_t must be B x D
  CHECK_THROWS_AS(dev.step(nullptr, nullptr), ValueError);
  CHECK_THROWS_AS(dev.reset_row(3), ValueError);
  CHECK_THROWS_AS(dev.reset_row(-1), ValueError);
  auto st = dev.download();
  st.keys.pop_back();
  CHECK_THROWS_AS(dev.upload(st), ShapeError);
  st = dev.download();
  st.activated[1] = 1;  // more activated tokens than consumed
  CHECK_THROWS_AS(dev.upload(st), ValueError);

  SeqBoatLayerConfig wc = stream_test::stream_config(k);
  wc.window_size = k.window + 1;
  SeqBoatLayer<float> other(wc, 1);
  SeqBoatLayerStreamer<float> other_cpu(other);
  CHECK_THROWS_AS(dev.set_state(other_cpu.make_state(3)), ShapeError);  // another window
  SeqBoatLayerStreamer<float> same_cpu(f.cpu);
  CHECK_THROWS_AS(dev.set_state(same_cpu.make_state(2)), ShapeError);   // another batch
}
