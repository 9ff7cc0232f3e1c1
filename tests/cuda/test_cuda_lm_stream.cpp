// SeqBoatLmStreamerDevice against the CPU's SeqBoatLmStreamer token by token: a small random LM (2 layers with
// feed-forward blocks; pre-norm layernorm with the simple bias and softmax, and post-norm rmsnorm with rotary, relu2,
// gelu blocks, EMA truncation and unscaled embeddings), B = 3 streams of 40 random tokens, router margins widened as
// in test_cuda_lm.cpp (model_test_support.hpp) so that no decision is a near tie (the chosen seeds route 8 to 26 of
// the 40 tokens, a different count in every stream and layer; the smallest margin |p1 - p0| is 3e-3 in double).
// Per step: the device logits against SeqBoatLmStreamer<double> within twice the error of SeqBoatLmStreamer<float>
// (cuda_test::accuracy), and every layer's decision equal to the CPU's. Then the logits against the device LM's full
// causal forward (per_row routing) at every position, the whole step replayed as a CUDA graph (bitwise equal to the
// plain steps), greedy generate against host argmaxes of plain steps, reset of one row and of all, and the errors.
// The LM stays in training mode while it streams: the streamer runs evaluation semantics whatever the switch.
#include "cuda_test_support.hpp"
#include "model_test_support.hpp"

#include <sma/cuda/buffer.hpp>
#include <sma/cuda/seqboat_lm.hpp>
#include <sma/cuda/seqboat_lm_stream_device.hpp>
#include <sma/models/lm.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

constexpr double kFloor = 1e-5;  // as test_cuda_lm.cpp: layers, blocks and norms summed in other orders

SeqBoatLmConfig postnorm_rotary_config() {
  SeqBoatLmConfig c = cuda_test::postnorm_rotary_lm_config();
  c.truncation = 5;
  return c;
}

/// The double and float CPU LMs with the same (float-representable) values, router margins widened, and the
/// (B, L) tokens drawn after them.
struct Setup {
  SeqBoatLmConfig cfg;
  SeqBoatLm<double> md;
  SeqBoatLm<float> mf;
  Tensor2<std::int32_t> tokens;
  Setup(const SeqBoatLmConfig& c, unsigned seed, int B, int L) : cfg(c), md(c, seed), mf(c, seed), tokens(B, L) {
    auto pd = cuda_test::params_of<double>(md);
    auto pf = cuda_test::params_of<float>(mf);
    std::mt19937 rng(seed * 7 + 1);
    std::normal_distribution<double> nd(0.0, 1.0);
    for (Index l = 0; l < c.layers; ++l)
      cuda_test::widen_router_margin(pd, str_cat("decoder.layers.", l, ".slag_layer."), c.embed_dim, rng, nd);
    cuda_test::share_values(pd, pf);
    for (Index i = 0; i < tokens.size(); ++i)
      tokens.data()[i] = static_cast<std::int32_t>(rng() % static_cast<unsigned>(c.vocab_size));
  }
  std::vector<int> column(Index t) const {  // every stream's token at position t
    std::vector<int> v(static_cast<std::size_t>(tokens.dimension(0)));
    for (Index b = 0; b < tokens.dimension(0); ++b) v[static_cast<std::size_t>(b)] = tokens(b, t);
    return v;
  }
};

/// max |a - b| / max(max |b|, 1e-3).
double rel(const float* a, const float* b, std::size_t n) {
  return cuda_test::max_abs_diff(a, b, n) / std::max(cuda_test::max_abs(b, n), 1e-3);
}

/// The host argmax with sma::sample_token's greedy rule (the first of equal maxima).
int host_argmax(const float* v, int V) {
  int best = 0;
  for (int i = 1; i < V; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

/// Steps the device streamer (host overload) and both CPU streamers through positions [from, to) of the tokens,
/// checking the accuracy rule at every step and the decisions of every layer; returns the device logits per step.
struct Run {
  Setup& s;
  SeqBoatLmStreamer<double> cd;
  SeqBoatLmStreamer<float> cf;
  SeqBoatLmState<double> std_;
  SeqBoatLmState<float> stf;
  cuda::SeqBoatLmStreamerDevice& dev;
  double worst_gpu = 0, worst_cpu = 0;
  Run(Setup& su, cuda::SeqBoatLmStreamerDevice& d)
      : s(su), cd(su.md), cf(su.mf), std_(cd.make_state(su.tokens.dimension(0))),
        stf(cf.make_state(su.tokens.dimension(0))), dev(d) {}

  std::vector<float> step(Index t) {
    const std::vector<int> tk = s.column(t);
    const std::vector<std::int32_t> tk32(tk.begin(), tk.end());
    const Tensor2<double> yd = cd.step(tk32, std_);
    const Tensor2<float> yf = cf.step(tk32, stf);
    const std::vector<float> got = dev.step(tk);
    REQUIRE(got.size() == static_cast<std::size_t>(yd.size()));
    const cuda_test::Accuracy a = cuda_test::accuracy(got.data(), yf.data(), yd.data(), got.size(), kFloor);
    worst_gpu = std::max(worst_gpu, a.gpu / std::max(a.scale, 1e-3));
    worst_cpu = std::max(worst_cpu, a.cpu_float / std::max(a.scale, 1e-3));
    if (!a.ok()) {
      INFO("step " << t << ": " << a);
      CHECK(a.ok());
    }
    for (int l = 0; l < dev.model().n_layers(); ++l) {
      const auto act = dev.layer_streamer(l).download().last_active;
      for (std::size_t b = 0; b < act.size(); ++b)
        if (act[b] != std_.layers[static_cast<std::size_t>(l)].last_active[b]) {
          INFO("step " << t << ", layer " << l << ", stream " << b << ": device decision " << int(act[b]));
          REQUIRE(act[b] == std_.layers[static_cast<std::size_t>(l)].last_active[b]);
        }
    }
    return got;
  }
};

void check_case(const char* name, const SeqBoatLmConfig& cfg, unsigned seed) {
  INFO("case " << name);
  const int B = 3, L = 40;
  Setup su(cfg, seed, B, L);
  const int V = static_cast<int>(cfg.vocab_size);
  cuda::SeqBoatLmDevice lm = cuda::SeqBoatLmDevice::from_cpu(su.mf);
  REQUIRE(lm.training());  // the streamer ignores the switch
  cuda::SeqBoatLmStreamerDevice dev(lm, B);
  REQUIRE(dev.batch() == B);
  REQUIRE(dev.vocab_size() == V);
  Run run(su, dev);
  std::vector<std::vector<float>> plain;
  for (Index t = 0; t < L; ++t) plain.push_back(run.step(t));
  INFO("max error / max |logit|: device " << run.worst_gpu << ", CPU float " << run.worst_cpu);
  CHECK(run.worst_gpu > 0);  // not a vacuous pass
  // Routing that differs between streams and is neither all nor nothing: the accuracy above covers the attention.
  for (int l = 0; l < lm.n_layers(); ++l) {
    const auto st = dev.layer_streamer(l).download();
    INFO("layer " << l << " activated " << st.activated[0] << ", " << st.activated[1] << ", " << st.activated[2]);
    for (int b = 0; b < B; ++b) {
      CHECK(st.position[static_cast<std::size_t>(b)] == L);
      CHECK(st.activated[static_cast<std::size_t>(b)] > cfg.window_size);
      CHECK(st.activated[static_cast<std::size_t>(b)] < L);
    }
  }

  // The device LM's full causal forward (per_row routing, evaluation mode) at every position.
  lm.set_training(false);
  cuda::DeviceArray<int> d_tokens(std::vector<int>(su.tokens.data(), su.tokens.data() + su.tokens.size()));
  cuda::DeviceArray<float> d_full(static_cast<std::size_t>(B) * L * V);
  lm.forward(B, L, d_tokens.data(), nullptr, d_full.data());
  const std::vector<float> full = d_full.download();
  double err_full = 0;
  for (Index t = 0; t < L; ++t)
    for (int b = 0; b < B; ++b) {
      const float* f = full.data() + (static_cast<std::size_t>(b) * L + t) * V;
      err_full = std::max(err_full, rel(plain[static_cast<std::size_t>(t)].data() + static_cast<std::size_t>(b) * V,
                                        f, static_cast<std::size_t>(V)));
    }
  INFO("max relative error against the device LM's full forward " << err_full);
  CHECK(err_full < 1e-4);
  lm.set_training(true);

  // The same steps as a CUDA graph from fixed device buffers, on a stream of the caller's.
  cuda::Stream stream;
  void* s = stream.handle();
  dev.reset(s);
  dev.set_graph(true);
  REQUIRE(dev.graph());
  cuda::DeviceArray<int> d_tok(static_cast<std::size_t>(B));
  cuda::DeviceArray<float> d_logits(static_cast<std::size_t>(B) * V);
  int differ = 0;
  for (Index t = 0; t < L; ++t) {
    d_tok.upload(su.column(t), s);
    dev.step(d_tok.data(), d_logits.data(), s);
    if (!cuda_test::bitwise_equal(d_logits.download(s), plain[static_cast<std::size_t>(t)])) ++differ;
  }
  INFO("graph steps whose logits differ from the plain steps' bits: " << differ);
  CHECK(differ == 0);
  CHECK_NOTHROW(dev.check_tokens(s));

  // Greedy generation (graph on) against plain steps fed host argmaxes, after a common prompt of 10 tokens.
  cuda::SeqBoatLmStreamerDevice twin(lm, B);
  dev.reset(s);
  for (Index t = 0; t < 10; ++t) {
    dev.step(su.column(t), s);
    twin.step(su.column(t), s);
  }
  const int n = 12;
  const std::vector<int> gen = dev.generate(su.column(10), n, s);
  REQUIRE(gen.size() == static_cast<std::size_t>(B) * n);
  std::vector<int> next = su.column(10);
  std::vector<float> last;
  for (int j = 0; j < n; ++j) {
    last = twin.step(next, s);
    for (int b = 0; b < B; ++b) {
      next[static_cast<std::size_t>(b)] = host_argmax(last.data() + static_cast<std::size_t>(b) * V, V);
      CHECK(gen[static_cast<std::size_t>(b) * n + j] == next[static_cast<std::size_t>(b)]);
    }
  }
  CHECK(cuda_test::bitwise_equal(dev.download_logits(s), last));  // the last step's logits stay
}

}  // namespace

TEST_CASE("device LM streamer equals the CPU LM streamer step by step", "[cuda][lm][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_case("prenorm layernorm silu, simple bias, softmax", cuda_test::small_lm_config(), 3);
  check_case("postnorm rmsnorm gelu, rotary, relu2, truncation 5, unscaled embedding", postnorm_rotary_config(), 5);
}

TEST_CASE("device LM streamer: reset of one row and of all", "[cuda][lm][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const int B = 3, L = 40;
  Setup su(cuda_test::small_lm_config(), 3, B, L);
  cuda::SeqBoatLmDevice lm = cuda::SeqBoatLmDevice::from_cpu(su.mf);
  cuda::SeqBoatLmStreamerDevice dev(lm, B);
  Run run(su, dev);
  for (Index t = 0; t < L; ++t) {
    if (t == 15) {  // stream 2 starts over; the others go on
      run.std_.reset_row(2);
      run.stf.reset_row(2);
      dev.reset_row(2);
      for (int l = 0; l < lm.n_layers(); ++l) {
        const auto st = dev.layer_streamer(l).download();
        CHECK(st.position[2] == 0);
        CHECK(st.activated[2] == 0);
        CHECK(st.position[1] == 15);
      }
    }
    if (t == 30) {  // everything starts over
      run.std_.reset();
      run.stf.reset();
      dev.reset();
    }
    run.step(t);
  }
  INFO("max error / max |logit|: device " << run.worst_gpu << ", CPU float " << run.worst_cpu);
  CHECK(run.worst_gpu > 0);
  const auto st = dev.layer_streamer(0).download();
  CHECK(st.position == std::vector<std::int64_t>{10, 10, 10});
}

TEST_CASE("device LM streamer: errors", "[cuda][lm][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  Setup su(cuda_test::small_lm_config(), 3, 3, 4);
  cuda::SeqBoatLmDevice lm = cuda::SeqBoatLmDevice::from_cpu(su.mf);
  CHECK_THROWS_WITH(cuda::SeqBoatLmStreamerDevice(lm, 0), Catch::Contains("batch must be in 1 .. 65535, got 0"));
  CHECK_THROWS_WITH(cuda::SeqBoatLmStreamerDevice(lm, 65536), Catch::Contains("batch must be in"));
  cuda::SeqBoatLmStreamerDevice dev(lm, 3);
  // Host tokens: the size, then the range, checked before anything is queued.
  CHECK_THROWS_AS(dev.step(std::vector<int>{1, 2}), ShapeError);
  CHECK_THROWS_WITH(dev.step(std::vector<int>{1, 37, 2}), Catch::Contains("token 37 of stream 1 is outside [0, 37)"));
  CHECK_THROWS_WITH(dev.step(std::vector<int>{1, 2, -1}), Catch::Contains("token -1 of stream 2"));
  CHECK(dev.layer_streamer(0).download().position == std::vector<std::int64_t>{0, 0, 0});
  CHECK_THROWS_WITH(dev.generate(std::vector<int>{1, 2, 40}, 3), Catch::Contains("token 40 of stream 2"));
  CHECK_THROWS_WITH(dev.generate(std::vector<int>{1, 2, 3}, 0), Catch::Contains("n_steps must be >= 1"));
  // Device tokens: recorded, reported by check_tokens (then cleared).
  cuda::DeviceArray<int> tok(std::vector<int>{4, 5, 6}), bad(std::vector<int>{4, 99, -3});
  cuda::DeviceArray<float> logits(3 * 37);
  CHECK_THROWS_WITH(dev.step(nullptr, logits.data()), Catch::Contains("tokens or logits is null"));
  CHECK_THROWS_WITH(dev.step(tok.data(), nullptr), Catch::Contains("tokens or logits is null"));
  dev.step(tok.data(), logits.data());
  CHECK_NOTHROW(dev.check_tokens());
  dev.step(bad.data(), logits.data());
  dev.step(tok.data(), logits.data());
  CHECK_THROWS_WITH(dev.check_tokens(), Catch::Contains("token 99 of stream 1 is outside [0, 37)"));
  CHECK_NOTHROW(dev.check_tokens());
  dev.step(bad.data(), logits.data());
  dev.reset();  // clears the record too
  CHECK_NOTHROW(dev.check_tokens());
  // Row and layer indices.
  CHECK_THROWS_WITH(dev.reset_row(3), Catch::Contains("row 3 of 3"));
  CHECK_THROWS_WITH(dev.reset_row(-1), Catch::Contains("row -1 of 3"));
  CHECK_THROWS_WITH(dev.layer_streamer(2), Catch::Contains("no layer 2"));
}

TEST_CASE("device LM streamer: a router shift changed between graph replays", "[cuda][lm][stream]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const int B = 3;
  Setup su(cuda_test::small_lm_config(), 3, B, 6);
  cuda::SeqBoatLmDevice lm = cuda::SeqBoatLmDevice::from_cpu(su.mf);
  cuda::SeqBoatLmStreamerDevice dev(lm, B);
  dev.set_graph(true);
  cuda::Stream stream;
  void* s = stream.handle();
  cuda::DeviceArray<int> tok(su.column(0));
  cuda::DeviceArray<float> logits(static_cast<std::size_t>(B) * 37);
  for (int t = 0; t < 2; ++t) dev.step(tok.data(), logits.data(), s);  // plain warm-up, then the capture
  for (const float shift : {1000.f, -1000.f, 1000.f}) {  // every token of layer 1 routed, none, every one
    lm.layer(1).set_router_shift(shift);
    dev.step(tok.data(), logits.data(), s);
    const auto act = dev.layer_streamer(1).download(s).last_active;
    for (int b = 0; b < B; ++b) CHECK(int(act[static_cast<std::size_t>(b)]) == (shift > 0 ? 1 : 0));
  }
}
