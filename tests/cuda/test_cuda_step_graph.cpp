// The opt-in step graph (set_step_graph, sma/cuda/step_graph.hpp) against the plain train_step: two device copies of
// one CPU model take the same steps, one plainly and one through the graph, and must agree bitwise on every loss,
// on the logits of a forward between steps and on every parameter and buffer at the end. The schedule covers the
// first step at a shape (plain), the capture, replays with a new learning rate each step, a new input pointer
// (recapture), a forward between steps, another batch size (plain again) and the return to the first shape; the
// counters say which of these happened. Both AdamW copies clip the gradient norm, so the clipping kernels are in
// the graph too. cuda::bounded_gemm runs every product plainly here (its size rule at the training shape): while a
// step is captured it cannot launch its chunk graphs and runs the products whole, which is bitwise the plain
// product only when the plain step did not chunk it either; a last case chunks them and checks closeness only.
#include "cuda_test_support.hpp"
#include "model_test_support.hpp"

#include <sma/cuda/seqboat_lm.hpp>
#include <sma/cuda/seqboat_model.hpp>
#include <sma/models/lm.hpp>
#include <sma/models/seqboat.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

/// cuda::bounded_gemm's size rule for the scope (the suite chunks every product: cuda_test_support.hpp).
struct MinGflop {
  double old;
  explicit MinGflop(double v) : old(cuda::bounded_gemm_min_gflop()) { cuda::set_bounded_gemm_min_gflop(v); }
  ~MinGflop() { cuda::set_bounded_gemm_min_gflop(old); }
};

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

SeqBoatModelConfig model_config() {
  SeqBoatModelConfig c = cuda_test::small_model_config();
  c.norm_type = NormType::batchnorm;  // running statistics and num_batches_tracked updated inside the graph
  c.prenorm = true;
  return c;
}

struct ClassifierData {
  int B, L;
  cuda::DeviceArray<float> x;
  cuda::DeviceArray<std::uint8_t> pad;
  cuda::DeviceArray<int> labels;
};

ClassifierData classifier_data(int B, int L, int d_input, int classes, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(static_cast<std::size_t>(B) * L * d_input);
  for (float& v : x) v = nd(rng);
  std::vector<std::uint8_t> pad(static_cast<std::size_t>(B) * L, 0);
  for (int b = 1; b < B; ++b)
    for (int t = L - 5 * b; t < L; ++t) pad[static_cast<std::size_t>(b) * L + t] = 1;
  std::vector<int> labels(static_cast<std::size_t>(B));
  for (int& l : labels) l = static_cast<int>(rng() % static_cast<unsigned>(classes));
  return {B, L, cuda::DeviceArray<float>(x), cuda::DeviceArray<std::uint8_t>(pad), cuda::DeviceArray<int>(labels)};
}

template <class Dev>
void require_same_params(Dev& plain, Dev& graph, void* s) {
  for (const std::string& n : plain.param_names()) {
    const std::vector<float> a = plain.param(n, s), b = graph.param(n, s);
    INFO("parameter " << n << ": max |plain - graph| " << cuda_test::max_abs_diff(a.data(), b.data(), a.size()));
    CHECK(cuda_test::bitwise_equal(a, b));
  }
}

/// `exact`: bitwise agreement required; otherwise the losses within 1e-3 relative. With `dropout`, both copies draw
/// the same masks only if every replay advances the layers' draw counters as a plain step does.
void check_classifier(const char* name, bool bf16, bool exact, double dropout = 0) {
  INFO("classifier case " << name);
  SeqBoatModelConfig cfg = model_config();
  cfg.dropout = dropout;
  SeqBoatModel<float> cpu(cfg, 5);
  for_each_param(cpu, [&](const std::string& n, Param<float>& p) {  // router margins widened (no near ties)
    if (n.find("hx_proj.weight") != std::string::npos)
      for (Index i = 0; i < 2 * cfg.d_model; ++i) p.data()[i] *= 4.f;
  });
  cuda::SeqBoatModelDevice plain = cuda::SeqBoatModelDevice::from_cpu(cpu);
  cuda::SeqBoatModelDevice graph = cuda::SeqBoatModelDevice::from_cpu(cpu);
  cuda::AdamWConfig ac;
  ac.weight_decay = 0.05;
  ac.clip_norm = 0.5;
  for (cuda::SeqBoatModelDevice* d : {&plain, &graph}) {
    d->set_bf16_projections(bf16);
    d->set_bf16_attention(bf16);
    d->set_optimizer(ac);
  }
  graph.set_step_graph(true);
  REQUIRE(graph.step_graph());
  cuda::Stream stream;
  void* s = stream.handle();
  const int Di = static_cast<int>(cfg.d_input), C = static_cast<int>(cfg.d_output);
  ClassifierData a = classifier_data(3, 40, Di, C, 1), b = classifier_data(3, 40, Di, C, 2),
                 c = classifier_data(2, 40, Di, C, 3);
  struct Step {
    ClassifierData* d;
    double lr;
  };
  // plain, capture, replay, replay (lr changes), capture (b), replay, [forward], plain (c), capture, plain (a),
  // capture, replay
  const std::vector<Step> steps{{&a, 2e-3}, {&a, 2e-3}, {&a, 1e-3}, {&a, 3e-3}, {&b, 3e-3}, {&b, 1e-3},
                                {&c, 1e-3}, {&c, 2e-3}, {&a, 2e-3}, {&a, 1e-3}, {&a, 5e-4}};
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const Step& st = steps[i];
    if (i == 6) {  // a forward between graph steps (same shape): both models agree, and the graph stays valid
      cuda::DeviceArray<float> la(static_cast<std::size_t>(b.B * C)), lb(la.size());
      plain.forward(b.B, b.L, b.x.data(), b.pad.data(), la.data(), s);
      graph.forward(b.B, b.L, b.x.data(), b.pad.data(), lb.data(), s);
      CHECK(cuda_test::bitwise_equal(la.download(s), lb.download(s)));
    }
    for (cuda::SeqBoatModelDevice* d : {&plain, &graph})
      d->train_step(st.d->B, st.d->L, st.d->x.data(), st.d->pad.data(), st.d->labels.data(), st.lr, s);
    const cuda::CrossEntropyValue lp = plain.read_loss(s), lg = graph.read_loss(s);
    INFO("step " << i << ": loss plain " << lp.loss << ", graph " << lg.loss);
    REQUIRE(std::isfinite(lg.loss));
    CHECK(lg.counted == lp.counted);
    if (exact)
      CHECK(same_bits(lp.loss, lg.loss));
    else
      CHECK(std::abs(lp.loss - lg.loss) <= 1e-3 * std::max(1.0, std::abs(lp.loss)));
  }
  const cuda::StepGraphStats st = graph.step_graph_stats();
  CHECK(st.plain == 3);
  CHECK(st.captures == 4);
  CHECK(st.replays == 4);
  CHECK(plain.optimizer().steps() == static_cast<long long>(steps.size()));
  CHECK(graph.optimizer().steps() == static_cast<long long>(steps.size()));
  if (exact) {
    CHECK(same_bits(plain.optimizer().last_grad_norm(s), graph.optimizer().last_grad_norm(s)));
    require_same_params(plain, graph, s);
  }
  if (dropout > 0)  // one draw per training forward: the steps and the forward between them
    for (cuda::SeqBoatModelDevice* d : {&plain, &graph})
      CHECK(d->layer(0).dropout_draw(s) == steps.size() + 1);
}

}  // namespace

TEST_CASE("cuda step graph: the classifier's graph steps equal the plain steps bitwise", "[cuda][graph][model]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  MinGflop plain_products(1e9);
  check_classifier("fp32", false, true);
  check_classifier("bf16 projections and attention", true, true);
  check_classifier("fp32 with dropout", false, true, 0.2);
  check_classifier("bf16 with dropout", true, true, 0.2);
}

TEST_CASE("cuda step graph: with chunked products (whole while captured) the classifier stays close",
          "[cuda][graph][model]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  MinGflop chunk_all(0.0);
  check_classifier("bf16, every bounded product chunked in the plain steps", true, false);
}

TEST_CASE("cuda step graph: the LM's graph steps equal the plain steps bitwise", "[cuda][graph][lm]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  MinGflop plain_products(1e9);
  SeqBoatLmConfig cfg;
  cfg.vocab_size = 37;
  cfg.embed_dim = 24;
  cfg.hidden_dim = 48;
  cfg.zdim = 16;
  cfg.ndim = 4;
  cfg.ffn_hidden_dim = 40;
  cfg.layers = 2;
  cfg.window_size = 8;
  cfg.max_positions = 128;
  for (const double dropout : {0.0, 0.2})
  for (bool bf16 : {false, true}) {
    INFO("bf16 " << bf16 << ", dropout " << dropout);
    cfg.dropout = dropout;  // the layers' and the blocks' (and activation_dropout): the same masks only if every
    cfg.activation_dropout = dropout / 2;  // replay advances the draw counters as a plain step does
    SeqBoatLm<float> cpu(cfg, 7);
    cuda::SeqBoatLmDevice plain = cuda::SeqBoatLmDevice::from_cpu(cpu);
    cuda::SeqBoatLmDevice graph = cuda::SeqBoatLmDevice::from_cpu(cpu);
    cuda::AdamWConfig ac;
    ac.clip_norm = 1.0;
    for (cuda::SeqBoatLmDevice* d : {&plain, &graph}) {
      d->set_bf16_projections(bf16);
      d->set_bf16_attention(bf16);
      d->set_optimizer(ac);
    }
    graph.set_step_graph(true);
    const int B = 3, L = 36, V = static_cast<int>(cfg.vocab_size);
    std::mt19937 rng(9);
    std::vector<int> t1(static_cast<std::size_t>(B) * L), t2(t1.size()), g1(t1.size()), g2(t1.size());
    for (int& t : t1) t = static_cast<int>(rng() % static_cast<unsigned>(V));
    for (int& t : t2) t = static_cast<int>(rng() % static_cast<unsigned>(V));
    for (std::size_t i = 0; i < t1.size(); ++i) {
      g1[i] = i % 11 == 3 ? -100 : t1[(i + 1) % t1.size()];  // some targets ignored
      g2[i] = t2[(i + 1) % t2.size()];
    }
    std::vector<std::uint8_t> pad(t1.size(), 0);
    for (int t = L - 6; t < L; ++t) pad[static_cast<std::size_t>(B - 1) * L + t] = 1;
    cuda::DeviceArray<int> d_t1(t1), d_t2(t2), d_g1(g1), d_g2(g2);
    cuda::DeviceArray<std::uint8_t> d_pad(pad);
    cuda::Stream stream;
    void* s = stream.handle();
    // plain, capture, replay, capture (new pointers), replay
    const std::vector<std::pair<int, double>> steps{{1, 2e-3}, {1, 1e-3}, {1, 3e-3}, {2, 3e-3}, {2, 5e-4}};
    for (std::size_t i = 0; i < steps.size(); ++i) {
      const bool first = steps[i].first == 1;
      for (cuda::SeqBoatLmDevice* d : {&plain, &graph})
        d->train_step(B, L, first ? d_t1.data() : d_t2.data(), d_pad.data(), first ? d_g1.data() : d_g2.data(),
                      steps[i].second, s);
      const cuda::CrossEntropyValue lp = plain.read_loss(s), lg = graph.read_loss(s);
      INFO("step " << i << ": loss plain " << lp.loss << ", graph " << lg.loss);
      CHECK(same_bits(lp.loss, lg.loss));
      CHECK(lp.counted == lg.counted);
    }
    const cuda::StepGraphStats st = graph.step_graph_stats();
    CHECK(st.plain == 1);
    CHECK(st.captures == 2);
    CHECK(st.replays == 2);
    require_same_params(plain, graph, s);
  }
}

TEST_CASE("cuda step graph: what it refuses", "[cuda][graph][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const SeqBoatModelConfig cfg = model_config();
  SeqBoatModel<float> cpu(cfg, 1);
  cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(cpu);
  dev.set_optimizer(cuda::AdamWConfig{});
  dev.set_step_graph(true);
  ClassifierData a = classifier_data(2, 16, static_cast<int>(cfg.d_input), static_cast<int>(cfg.d_output), 4);
  CHECK_THROWS_WITH(dev.train_step(a.B, a.L, a.x.data(), a.pad.data(), a.labels.data(), 1e-3, nullptr),
                    Catch::Contains("needs a stream"));
  cuda::Stream stream;
  dev.layer(1).set_host_compressed_length(true);
  CHECK_THROWS_WITH(dev.train_step(a.B, a.L, a.x.data(), a.pad.data(), a.labels.data(), 1e-3, stream.handle()),
                    Catch::Contains("host_compressed_length"));
  dev.layer(1).set_host_compressed_length(false);
  dev.set_step_graph(false);  // off: plain steps, no counters moved
  dev.train_step(a.B, a.L, a.x.data(), a.pad.data(), a.labels.data(), 1e-3, stream.handle());
  CHECK(dev.step_graph_stats().plain == 0);
  CHECK(std::isfinite(dev.read_loss(stream.handle()).loss));
}

TEST_CASE("cuda step graph: DeviceAdamW's prepared step equals its plain step bitwise", "[cuda][graph][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  const std::size_t n = 10000, n2 = 37;  // several chunks of 4096, and a small second range without decay
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> w(n), w2(n2);
  for (float& v : w) v = nd(rng);
  for (float& v : w2) v = nd(rng);
  cuda::DeviceArray<float> wa(w), wb(w), wa2(w2), wb2(w2), ga(n), gb(n), ga2(n2), gb2(n2);
  cuda::AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  cfg.clip_norm = 2.0;
  cuda::DeviceAdamW a({{wa.data(), ga.data(), static_cast<long long>(n), true},
                       {wa2.data(), ga2.data(), static_cast<long long>(n2), false}},
                      cfg);
  cuda::DeviceAdamW b({{wb.data(), gb.data(), static_cast<long long>(n), true},
                       {wb2.data(), gb2.data(), static_cast<long long>(n2), false}},
                      cfg);
  cuda::Stream stream;
  void* s = stream.handle();
  for (double lr : {1e-2, 3e-3, 0.0, 5e-2}) {
    std::vector<float> g(n), g2(n2);
    for (float& v : g) v = 0.3f * nd(rng);
    for (float& v : g2) v = 0.3f * nd(rng);
    ga.upload(g, s);
    gb.upload(g, s);
    ga2.upload(g2, s);
    gb2.upload(g2, s);
    a.step(lr, s, /*zero_grads=*/true);
    b.prepare_step(lr, s);
    b.step_prepared(s, /*zero_grads=*/true);
  }
  CHECK(a.steps() == 4);
  CHECK(b.steps() == 4);
  CHECK(cuda_test::bitwise_equal(wa.download(s), wb.download(s)));
  CHECK(cuda_test::bitwise_equal(wa2.download(s), wb2.download(s)));
  CHECK(cuda_test::bitwise_equal(gb.download(s), std::vector<float>(n, 0.f)));  // cleared after use
  CHECK(same_bits(a.last_grad_norm(s), b.last_grad_norm(s)));
  CHECK(!cuda_test::bitwise_equal(wa.download(s), w));  // the steps did move the weights
}
