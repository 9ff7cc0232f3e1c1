// SeqBoatLmDevice against the CPU SeqBoatLm (double reference, float CPU path for the error budget): logits, the
// token-level loss with ignored targets, every parameter gradient (the tied embedding's two parts included), and
// the parameters after 3 AdamW steps (train_step on the device, sma::train::Optimizer on the CPU; in the first
// configuration with the global gradient norm clipped as sma::optim::clip_grad_norm does). Configurations:
// pre-norm layernorm with silu blocks and ragged padding; post-norm rmsnorm with gelu blocks, rotary, relu2
// attention and unscaled embeddings; no feed-forward blocks. The router margins are widened as in
// test_cuda_model.cpp so that no decision is a near tie. Then the error cases, and the embedding gradient's
// determinism.
#include "cuda_test_support.hpp"
#include "model_test_support.hpp"

#include <sma/cuda/seqboat_lm.hpp>
#include <sma/models/lm.hpp>
#include <sma/optim/loss.hpp>
#include <sma/optim/optimizer.hpp>
#include <sma/train/optimizer.hpp>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

// As the classifier's model test: the LM chains layers, blocks and norms whose sums the device and the float CPU path
// take in different orders.
constexpr double kFloor = 1e-5;

/// `clip`: the steps clip the global gradient norm at half the first step's (so that clipping acts). `kind`: the
/// optimiser (SGD with Nesterov momentum).
void check_lm(const char* name, const SeqBoatLmConfig& cfg, bool ragged, unsigned seed, bool clip = false,
              train::OptimizerKind kind = train::OptimizerKind::adamw) {
  INFO("LM case " << name << ", " << train::to_string(kind));
  SeqBoatLm<double> md(cfg, seed);
  SeqBoatLm<float> mf(cfg, seed);
  auto pd = cuda_test::params_of<double>(md);
  auto pf = cuda_test::params_of<float>(mf);
  std::mt19937 rng(seed * 7 + 1);
  std::normal_distribution<double> nd(0.0, 1.0);
  const Index D = cfg.embed_dim;
  for (Index l = 0; l < cfg.layers; ++l)
    cuda_test::widen_router_margin(pd, str_cat("decoder.layers.", l, ".slag_layer."), D, rng, nd);
  cuda_test::share_values(pd, pf);
  const int B = 3, L = 45, V = static_cast<int>(cfg.vocab_size);
  Tensor2<std::int32_t> tokens(B, L);
  for (Index i = 0; i < tokens.size(); ++i) tokens.data()[i] = static_cast<std::int32_t>(rng() % V);
  const auto [mask, flat] = cuda_test::row_tail_padding(B, L, ragged);
  // next-token targets (row-major tokens (B, L)); the last position, padded positions and every 5th are ignored
  std::vector<std::int64_t> targets(static_cast<std::size_t>(B) * L, -100);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t + 1 < L; ++t)
      if (!mask(b, t) && (b * L + t) % 5 != 2) targets[static_cast<std::size_t>(b) * L + t] = tokens(b, t + 1);
  const std::vector<int> targets32(targets.begin(), targets.end());
  long long counted = 0;
  for (auto y : targets) counted += y != -100;

  cuda::Stream stream;
  void* s = stream.handle();
  cuda::SeqBoatLmDevice dev = cuda::SeqBoatLmDevice::from_cpu(mf);
  REQUIRE(dev.training());
  cuda::DeviceArray<int> d_tokens(std::vector<int>(tokens.data(), tokens.data() + tokens.size()));
  cuda::DeviceArray<std::uint8_t> d_mask(flat);
  cuda::DeviceArray<int> d_targets(targets32);
  cuda::DeviceArray<float> d_logits(static_cast<std::size_t>(B) * L * V);
  const std::uint8_t* d_pad = ragged ? d_mask.data() : nullptr;

  Context ctx(Mode::train);
  if (ragged) ctx.padding = &mask;
  typename SeqBoatLm<double>::Cache cd;
  typename SeqBoatLm<float>::Cache cf;
  auto cpu_step = [&](auto& model, auto& cache) {
    using T = typename std::decay_t<decltype(model)>::Scalar;
    zero_grad(model);
    const Tensor3<T> y = model.forward(ctx, tokens, cache);
    Matrix<T> dl;
    const optim::LossResult r = optim::cross_entropy<T>(as_matrix(y), targets, &dl);
    Tensor3<T> dlt(B, L, V);
    as_matrix(dlt) = dl;
    model.backward(ctx, dlt, cache);
    return std::make_pair(y, r.loss);
  };
  const auto [yd, lossd] = cpu_step(md, cd);
  const auto [yf, lossf] = cpu_step(mf, cf);

  dev.forward(B, L, d_tokens.data(), d_pad, d_logits.data(), s);
  dev.loss(d_targets.data(), -100, s);
  dev.backward_loss(s);
  const cuda::CrossEntropyValue lv = dev.read_loss(s);
  stream.synchronize();

  cuda_test::require_same_routing(cd, dev, B, L, s, "");
  const auto logits = cuda_test::check_logits_and_loss(d_logits, yf, yd, lv, lossd, lossf, counted, kFloor);
  CHECK(logits.scale > 0);  // not a vacuous pass
  CHECK(dev.param_names().size() == pd.size());
  cuda_test::check_gradients(dev, pd, pf, s, kFloor);  // no buffers: the LM has no batchnorm
  // add_grads_to: the device gradients land in a CPU model under the same names
  {
    SeqBoatLm<float> other(cfg, seed + 100);
    zero_grad(other);
    dev.add_grads_to(other, s);
    const auto& e = other.embedding();
    const std::vector<float> g = dev.grad("decoder.embed_tokens.weight", s);
    CHECK(cuda_test::max_abs_diff(e.grad(), g.data(), g.size()) == 0);
  }

  // 3 steps (sma::train::Optimizer's rule: decay on matrices only) from here.
  double norm0 = 0;
  for (auto& [n, p] : pd)
    for (Index i = 0; i < p->size(); ++i) norm0 += p->grad()[i] * p->grad()[i];
  const double clip_norm = clip ? 0.5 * std::sqrt(norm0) : 0.0;
  const std::map<std::string, std::vector<double>> w0 = cuda_test::snapshot(pd);
  cuda_test::CpuOptimizer cpu_opt(md, mf, kind);
  cpu_opt.set_on(dev, clip_norm);
  pd = cuda_test::params_of<double>(md);
  pf = cuda_test::params_of<float>(mf);
  const double lr = 2e-3;
  for (int step = 0; step < 3; ++step) {
    cpu_step(md, cd);
    cpu_step(mf, cf);
    if (clip) {
      const double nd_ = optim::clip_grad_norm(cpu_opt.bd, clip_norm);
      const double nf = optim::clip_grad_norm(cpu_opt.bf, clip_norm);
      dev.train_step(B, L, d_tokens.data(), d_pad, d_targets.data(), lr, s);
      const double ng = dev.optimizer().last_grad_norm(s);
      INFO("step " << step << ": gradient norm " << ng << " (double " << nd_ << ", float " << nf << "), clip at "
                   << clip_norm);
      CHECK(nd_ > clip_norm);  // clipping acts
      CHECK(std::abs(ng - nd_) <= 2 * std::abs(nf - nd_) + 1e-5 * nd_);
    } else {
      dev.train_step(B, L, d_tokens.data(), d_pad, d_targets.data(), lr, s);
    }
    cpu_opt.step(lr);
  }
  stream.synchronize();
  cuda_test::require_same_routing(cd, dev, B, L, s, "after training, ", /*near_ties=*/true);
  CHECK(dev.optimizer().steps() == 3);
  cuda_test::check_params_after_steps(dev, pd, pf, w0, s);
  // copy_params_to: the CPU float model takes the device's values
  dev.copy_params_to(mf, s);
  const std::vector<float> e = dev.param("decoder.embed_tokens.weight", s);
  CHECK(cuda_test::max_abs_diff(mf.embedding().data(), e.data(), e.size()) == 0);
}

}  // namespace

TEST_CASE("cuda SeqBoat LM matches the CPU LM (forward, loss, gradients, AdamW)", "[cuda][lm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  {
    SeqBoatLmConfig c = cuda_test::small_lm_config();
    check_lm("prenorm layernorm silu, ragged, gradient clipping", c, true, 3, /*clip=*/true);
  }
  {
    const SeqBoatLmConfig c = cuda_test::postnorm_rotary_lm_config();
    check_lm("postnorm rmsnorm gelu rotary relu2, unscaled embedding", c, false, 4);
  }
  {
    SeqBoatLmConfig c = cuda_test::small_lm_config();
    c.ffn_hidden_dim = 0;
    c.layers = 1;
    c.norm_type = NormType::scalenorm;
    check_lm("no feed-forward blocks, scalenorm, ragged", c, true, 5);
  }
}

TEST_CASE("cuda SeqBoat LM trains with RAdam and SGD as the CPU does", "[cuda][lm][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_lm("prenorm layernorm silu, ragged, gradient clipping", cuda_test::small_lm_config(), true, 3, /*clip=*/true,
           train::OptimizerKind::radam);
  SeqBoatLmConfig c = cuda_test::small_lm_config();
  c.ffn_hidden_dim = 0;
  c.layers = 1;
  c.norm_type = NormType::scalenorm;
  check_lm("no feed-forward blocks, scalenorm, ragged", c, true, 5, /*clip=*/false, train::OptimizerKind::sgd);
}

TEST_CASE("cuda SeqBoat LM: the embedding gradient is the same on every run", "[cuda][lm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatLmConfig c = cuda_test::small_lm_config();
  c.vocab_size = 5;  // few tokens, long runs per token
  c.layers = 1;
  SeqBoatLm<float> m(c, 2);
  cuda::SeqBoatLmDevice dev = cuda::SeqBoatLmDevice::from_cpu(m);
  const int B = 4, L = 300;
  std::mt19937 rng(11);
  std::vector<int> tok(static_cast<std::size_t>(B) * L), tgt(tok.size());
  for (auto& t : tok) t = static_cast<int>(rng() % 5);
  for (std::size_t i = 0; i < tok.size(); ++i) tgt[i] = tok[(i + 1) % tok.size()];
  cuda::DeviceArray<int> d_tok(tok), d_tgt(tgt);
  cuda::Stream stream;
  void* s = stream.handle();
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    dev.zero_grad(s);
    dev.forward(B, L, d_tok.data(), nullptr, nullptr, s);
    dev.loss(d_tgt.data(), -100, s);
    dev.backward_loss(s);
    const std::vector<float> g = dev.grad("decoder.embed_tokens.weight", s);
    REQUIRE(cuda_test::max_abs(g.data(), g.size()) > 0);
    if (run == 0)
      first = g;
    else
      CHECK(cuda_test::bitwise_equal(first, g));
  }
}

TEST_CASE("cuda SeqBoat LM: unsupported configurations and misuse", "[cuda][lm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatLmConfig c = cuda_test::small_lm_config();
  c.attention_dropout = 0.1;  // on the device since session 8, as the layers' and the blocks' dropout
  c.dropout = 0.2;
  SeqBoatLm<float> dr(c, 1);
  CHECK(cuda::SeqBoatLmDevice::from_cpu(dr).config().dropout == 0.2f);
  CHECK(cuda::SeqBoatLmDevice::from_cpu(dr, true).config().dropout == 0.f);
  c = cuda_test::small_lm_config();
  c.norm_type = NormType::batchnorm;
  SeqBoatLm<float> bn(c, 1);
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice::from_cpu(bn), Catch::Contains("batchnorm"));
  c = cuda_test::small_lm_config();
  SeqBoatLm<float> ok(c, 1);
  cuda::SeqBoatLmDevice dev = cuda::SeqBoatLmDevice::from_cpu(ok);
  CHECK_THROWS_WITH(dev.backward_loss(), Catch::Contains("no forward"));
  CHECK_THROWS_WITH(dev.forward(0, 4, nullptr, nullptr), Catch::Contains("must be >= 1"));
  CHECK_THROWS_WITH(dev.forward(2, 4, nullptr, nullptr), Catch::Contains("tokens is null"));
  CHECK_THROWS_AS(dev.grad("nope"), KeyError);
  cuda::DeviceArray<int> tok(std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8});
  CHECK_THROWS_WITH(dev.train_step(2, 4, tok.data(), nullptr, tok.data(), 1e-3), Catch::Contains("no optimiser"));
  dev.set_optimizer(cuda::AdamWConfig{});
  CHECK_THROWS_WITH(dev.optimizer().last_grad_norm(), Catch::Contains("clipping is off"));
  cuda::AdamWConfig clipped;
  clipped.clip_norm = 1.0;
  dev.set_optimizer(clipped);
  CHECK_THROWS_WITH(dev.optimizer().last_grad_norm(), Catch::Contains("no step"));
  cuda::Stream stream;
  void* s = stream.handle();
  // A token outside [0, V): recorded by the forward, named when read.
  cuda::DeviceArray<int> bad_tok(std::vector<int>{1, 2, 3, 4, 5, 37, 7, -1});
  dev.forward(2, 4, bad_tok.data(), nullptr, nullptr, s);
  CHECK_THROWS_WITH(dev.check_tokens(s), Catch::Contains("token 37 at flat index 5"));
  dev.loss(tok.data(), -100, s);
  CHECK_THROWS_WITH(dev.read_loss(s), Catch::Contains("outside [0, 37)"));
  // Good tokens again: nothing to report.
  dev.forward(2, 4, tok.data(), nullptr, nullptr, s);
  CHECK_NOTHROW(dev.check_tokens(s));
  // A target outside [0, V).
  cuda::DeviceArray<int> bad_tgt(std::vector<int>{1, 2, -100, 4, 40, 6, 7, 8});
  dev.loss(bad_tgt.data(), -100, s);
  CHECK_THROWS_WITH(dev.read_loss(s), Catch::Contains("label 40 at row 4"));
  // An LM of another shape cannot take the device gradients.
  SeqBoatLmConfig c2 = cuda_test::small_lm_config();
  c2.vocab_size = 50;
  SeqBoatLm<float> other(c2, 1);
  CHECK_THROWS_AS(dev.add_grads_to(other), ShapeError);
  // Parameters of the wrong size, or missing.
  cuda::SeqBoatLmDeviceConfig mc;
  mc.vocab_size = 10;
  mc.d_model = 24;
  CHECK_THROWS_AS(cuda::SeqBoatLmDevice(mc, {}, {{"decoder.embed_tokens.weight", std::vector<float>(7)}}, {}),
                  ShapeError);
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice(mc, {}, {}, {}), Catch::Contains("decoder.embed_tokens.weight is missing"));
  // A layer of another width cannot join the LM.
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice(mc, cuda_test::narrow_layers(c.layer_config()), {}, {}),
                    Catch::Contains("embed_dim 8"));
}

namespace {

// The LM's loss on the device with the dropout masks of draw 1 of seed 5 (each call reseeds, so every copy draws the
// same masks), for the CPU model's current values; with `grads` also every gradient.
double device_lm_loss(SeqBoatLm<float>& cpu, int B, int L, const cuda::DeviceArray<int>& tok,
                      const cuda::DeviceArray<int>& tgt, bool training,
                      std::map<std::string, std::vector<float>>* grads = nullptr) {
  cuda::SeqBoatLmDevice dev = cuda::SeqBoatLmDevice::from_cpu(cpu);
  cuda::Stream stream;
  void* s = stream.handle();
  dev.set_training(training);
  dev.set_dropout_seed(5, s);
  dev.zero_grad(s);
  dev.forward(B, L, tok.data(), nullptr, nullptr, s);
  dev.loss(tgt.data(), -100, s);
  if (grads) {
    dev.backward_loss(s);
    for (const std::string& n : dev.param_names()) (*grads)[n] = dev.grad(n, s);
  }
  return dev.read_loss(s).loss;
}

}  // namespace

// The feed-forward blocks' dropout (output and activation) and the layers' on the device: with the masks held
// fixed, the backward must be the derivative of the forward. A central difference of the fp32 loss along a random
// direction in the blocks' parameters (one layer, so no routing decision depends on them) against the gradient.
TEST_CASE("cuda SeqBoat LM: with dropout the backward is the derivative of the forward (fixed masks)",
          "[cuda][lm][dropout][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  for (const bool prenorm : {true, false}) {
    SeqBoatLmConfig c = prenorm ? cuda_test::small_lm_config() : cuda_test::postnorm_rotary_lm_config();
    INFO((prenorm ? "prenorm" : "postnorm"));
    c.layers = 1;
    c.dropout = 0.25;
    c.activation_dropout = 0.2;
    SeqBoatLm<float> cpu(c, 3);
    const int B = 2, L = 30, V = static_cast<int>(c.vocab_size);
    std::mt19937 rng(4);
    std::vector<int> tok(static_cast<std::size_t>(B) * L), tgt(tok.size());
    for (int& t : tok) t = static_cast<int>(rng() % static_cast<unsigned>(V));
    for (std::size_t i = 0; i < tok.size(); ++i) tgt[i] = tok[(i + 1) % tok.size()];
    cuda::DeviceArray<int> d_tok(tok), d_tgt(tgt);
    std::map<std::string, std::vector<float>> g;
    const double l0 = device_lm_loss(cpu, B, L, d_tok, d_tgt, true, &g);
    const double l_eval = device_lm_loss(cpu, B, L, d_tok, d_tgt, false);
    INFO("loss with dropout " << l0 << ", in eval mode " << l_eval);
    CHECK(std::abs(l0 - l_eval) > 1e-4);  // the masks change the loss
    // Direction: random over the block's parameters.
    auto params = cuda_test::params_of<float>(cpu);
    std::map<std::string, std::vector<float>> dir, base;
    std::normal_distribution<float> nd(0.f, 1.f);
    double analytic = 0;
    for (auto& [n, p] : params) {
      if (n.find(".nffn.") == std::string::npos) continue;
      std::vector<float>& v = dir[n];
      v.resize(static_cast<std::size_t>(p->size()));
      base[n].assign(p->data(), p->data() + p->size());
      for (std::size_t i = 0; i < v.size(); ++i) {
        v[i] = nd(rng);
        analytic += static_cast<double>(v[i]) * g.at(n)[i];
      }
    }
    REQUIRE(dir.size() >= 4);
    const float eps = 1e-2f;
    double lp = 0, lm = 0;
    for (const float sign : {1.f, -1.f}) {
      for (auto& [n, v] : dir)
        for (std::size_t i = 0; i < v.size(); ++i) params.at(n)->data()[i] = base[n][i] + sign * eps * v[i];
      (sign > 0 ? lp : lm) = device_lm_loss(cpu, B, L, d_tok, d_tgt, true);
    }
    const double fd = (lp - lm) / (2.0 * eps);
    INFO("directional derivative: analytic " << analytic << ", central difference " << fd);
    CHECK(std::abs(fd - analytic) <= 0.02 * std::abs(analytic) + 2e-4);
  }
}
