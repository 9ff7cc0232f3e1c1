// SeqBoatLmDevice against the CPU SeqBoatLm (double reference, float CPU path for the error budget): logits, the
// token-level loss with ignored targets, every parameter gradient (the tied embedding's two parts included), and
// the parameters after 3 AdamW steps (train_step on the device, sma::train::Optimizer on the CPU; in the first
// configuration with the global gradient norm clipped as sma::optim::clip_grad_norm does). Configurations:
// pre-norm layernorm with silu blocks and ragged padding; post-norm rmsnorm with gelu blocks, rotary, relu2
// attention and unscaled embeddings; no feed-forward blocks. The router margins are widened as in
// test_cuda_model.cpp so that no decision is a near tie. Then the error cases, and the embedding gradient's
// determinism.
#include "cuda_test_support.hpp"
#include "optimizer_setup.hpp"

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

SeqBoatLmConfig small_config() {
  SeqBoatLmConfig c;
  c.vocab_size = 37;
  c.embed_dim = 24;
  c.hidden_dim = 48;
  c.zdim = 16;
  c.ndim = 4;
  c.ffn_hidden_dim = 40;
  c.layers = 2;
  c.window_size = 8;
  c.max_positions = 128;
  return c;
}

double norm_diff(const float* a, const double* b, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

// As the classifier's model test: the LM chains layers, blocks and norms whose sums the device and the float CPU path
// take in different orders.
constexpr double kFloor = 1e-5;

// The routing decisions agree with the double CPU model's. `near_ties`: after training steps the device's float
// weights have drifted from the double ones by rounding, so a token whose two router probabilities (in double) are
// within kTieMargin may go either way; at most one such token per layer is let through.
constexpr double kTieMargin = 1e-4;

template <class Cache>
void require_same_routing(const Cache& cache, cuda::SeqBoatLmDevice& dev, int B, int L, void* s, const char* when,
                          bool near_ties = false) {
  for (int l = 0; l < dev.n_layers(); ++l) {
    const std::vector<std::uint8_t> act = dev.layer(l).active(s);
    const auto& router = cache.layers[static_cast<std::size_t>(l)].router;
    int differ = 0, ties = 0, on = 0;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < L; ++t) {
        const std::uint8_t a = act[static_cast<std::size_t>(b) * L + t];
        on += a;
        if (router.active(b, t) == a) continue;
        const Index i = static_cast<Index>(b) * L + t;
        const bool tie = std::abs(double(router.probs(i, 1)) - double(router.probs(i, 0))) < kTieMargin;
        if (near_ties && tie)
          ++ties;
        else
          ++differ;
      }
    INFO(when << "layer " << l << ": " << on << " active tokens of " << B * L << ", " << ties << " near ties");
    REQUIRE(differ == 0);
    REQUIRE(ties <= 1);
  }
}

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
  for (Index l = 0; l < cfg.layers; ++l) {
    const std::string pre = str_cat("decoder.layers.", l, ".slag_layer.");
    for (Index i = 0; i < 2 * D; ++i) pd.at(pre + "hx_proj.weight")->data()[i] = 0.8 * nd(rng);
    for (const char* n : {"beta", "mx_proj.bias", "h_proj.bias"})
      for (Index i = 0; i < pd.at(pre + n)->size(); ++i) pd.at(pre + n)->data()[i] = 0.1 * nd(rng);
  }
  for (auto& [n, p] : pd) {
    Param<float>& f = *pf.at(n);
    REQUIRE(f.size() == p->size());
    for (Index i = 0; i < p->size(); ++i) {
      f.data()[i] = static_cast<float>(p->data()[i]);
      p->data()[i] = static_cast<double>(f.data()[i]);
    }
  }
  const int B = 3, L = 45, V = static_cast<int>(cfg.vocab_size);
  Tensor2<std::int32_t> tokens(B, L);
  for (Index i = 0; i < tokens.size(); ++i) tokens.data()[i] = static_cast<std::int32_t>(rng() % V);
  Mask mask(B, L);
  mask.setZero();
  std::vector<std::uint8_t> flat(static_cast<std::size_t>(B) * L, 0);
  if (ragged)
    for (int b = 1; b < B; ++b)
      for (int t = L - 7 * b; t < L; ++t) {
        mask(b, t) = 1;
        flat[static_cast<std::size_t>(b) * L + t] = 1;
      }
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

  require_same_routing(cd, dev, B, L, s, "");
  {
    const std::vector<float> lg = d_logits.download();
    const auto a = cuda_test::accuracy(lg.data(), yf.data(), yd.data(), lg.size(), kFloor);
    INFO("logits: " << a);
    CHECK(a.ok());
    CHECK(a.scale > 0);  // not a vacuous pass
    const double el = std::abs(lv.loss - lossd), ef = std::abs(lossf - lossd);
    INFO("loss " << lv.loss << " (double " << lossd << ", float " << lossf << ")");
    CHECK(el <= 2 * ef + 1e-5 * std::abs(lossd));
    CHECK(lv.counted == counted);
  }
  CHECK(dev.param_names().size() == pd.size());
  for (auto& [n, p] : pd) {
    const std::vector<float> g = dev.grad(n, s);
    REQUIRE(g.size() == static_cast<std::size_t>(p->size()));
    const auto a = cuda_test::accuracy(g.data(), pf.at(n)->grad(), p->grad(), g.size(), kFloor);
    INFO("d " << n << ": " << a);
    CHECK(a.ok());
  }
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
  std::map<std::string, std::vector<double>> w0;
  for (auto& [n, p] : pd) w0[n] = std::vector<double>(p->data(), p->data() + p->size());
  train::OptimizerConfig oc;
  oc.kind = kind;
  oc.nesterov = kind == train::OptimizerKind::sgd;
  oc.weight_decay = 0.05;
  ParamBuffer<double> bd(md);
  ParamBuffer<float> bf(mf);
  train::Optimizer<double> od(bd, oc);
  train::Optimizer<float> of(bf, oc);
  cuda::AdamWConfig ac;
  ac.beta1 = oc.beta1;
  ac.beta2 = oc.beta2;
  ac.eps = oc.eps;
  ac.weight_decay = oc.weight_decay;
  ac.clip_norm = clip_norm;
  if (kind == train::OptimizerKind::adamw)
    dev.set_optimizer(ac);
  else
    dev.set_optimizer(cuda_test::device_optimizer(oc, clip_norm));
  pd = cuda_test::params_of<double>(md);
  pf = cuda_test::params_of<float>(mf);
  const double lr = 2e-3;
  for (int step = 0; step < 3; ++step) {
    cpu_step(md, cd);
    cpu_step(mf, cf);
    if (clip) {
      const double nd_ = optim::clip_grad_norm(bd, clip_norm), nf = optim::clip_grad_norm(bf, clip_norm);
      dev.train_step(B, L, d_tokens.data(), d_pad, d_targets.data(), lr, s);
      const double ng = dev.optimizer().last_grad_norm(s);
      INFO("step " << step << ": gradient norm " << ng << " (double " << nd_ << ", float " << nf << "), clip at "
                   << clip_norm);
      CHECK(nd_ > clip_norm);  // clipping acts
      CHECK(std::abs(ng - nd_) <= 2 * std::abs(nf - nd_) + 1e-5 * nd_);
    } else {
      dev.train_step(B, L, d_tokens.data(), d_pad, d_targets.data(), lr, s);
    }
    od.step(lr);
    of.step(lr);
  }
  stream.synchronize();
  require_same_routing(cd, dev, B, L, s, "after training, ", /*near_ties=*/true);
  CHECK(dev.optimizer().steps() == 3);
  for (auto& [n, p] : pd) {
    const std::vector<float> v = dev.param(n, s);
    const std::size_t k = v.size();
    const double upd = norm_diff(pf.at(n)->data(), w0.at(n).data(), k);
    double upd_d = 0;
    for (std::size_t i = 0; i < k; ++i) upd_d += (p->data()[i] - w0.at(n)[i]) * (p->data()[i] - w0.at(n)[i]);
    upd_d = std::sqrt(upd_d);
    const double e_dev = norm_diff(v.data(), p->data(), k), e_f = norm_diff(pf.at(n)->data(), p->data(), k);
    INFO("after 3 steps, " << n << ": |dev - double| " << e_dev << ", |float - double| " << e_f << ", |update| "
                           << upd_d << " (float " << upd << ")");
    CHECK(e_dev <= 2 * e_f + 1e-2 * upd_d + 1e-7);
  }
  // copy_params_to: the CPU float model takes the device's values
  dev.copy_params_to(mf, s);
  const std::vector<float> e = dev.param("decoder.embed_tokens.weight", s);
  CHECK(cuda_test::max_abs_diff(mf.embedding().data(), e.data(), e.size()) == 0);
}

}  // namespace

TEST_CASE("cuda SeqBoat LM matches the CPU LM (forward, loss, gradients, AdamW)", "[cuda][lm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  {
    SeqBoatLmConfig c = small_config();
    check_lm("prenorm layernorm silu, ragged, gradient clipping", c, true, 3, /*clip=*/true);
  }
  {
    SeqBoatLmConfig c = small_config();
    c.prenorm = false;
    c.norm_type = NormType::rmsnorm;
    c.activation = Activation::gelu;
    c.rel_pos = ops::PositionEncoding::rotary;
    c.attention_activation = ops::AttentionActivation::relu2;
    c.scale_embedding = false;
    check_lm("postnorm rmsnorm gelu rotary relu2, unscaled embedding", c, false, 4);
  }
  {
    SeqBoatLmConfig c = small_config();
    c.ffn_hidden_dim = 0;
    c.layers = 1;
    c.norm_type = NormType::scalenorm;
    check_lm("no feed-forward blocks, scalenorm, ragged", c, true, 5);
  }
}

TEST_CASE("cuda SeqBoat LM trains with RAdam and SGD as the CPU does", "[cuda][lm][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  check_lm("prenorm layernorm silu, ragged, gradient clipping", small_config(), true, 3, /*clip=*/true,
           train::OptimizerKind::radam);
  SeqBoatLmConfig c = small_config();
  c.ffn_hidden_dim = 0;
  c.layers = 1;
  c.norm_type = NormType::scalenorm;
  check_lm("no feed-forward blocks, scalenorm, ragged", c, true, 5, /*clip=*/false, train::OptimizerKind::sgd);
}

TEST_CASE("cuda SeqBoat LM: the embedding gradient is the same on every run", "[cuda][lm][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatLmConfig c = small_config();
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
  SeqBoatLmConfig c = small_config();
  c.dropout = 0.1;
  SeqBoatLm<float> dr(c, 1);
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice::from_cpu(dr), Catch::Contains("dropout"));
  c = small_config();
  c.norm_type = NormType::batchnorm;
  SeqBoatLm<float> bn(c, 1);
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice::from_cpu(bn), Catch::Contains("batchnorm"));
  c = small_config();
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
  SeqBoatLmConfig c2 = small_config();
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
  std::vector<cuda::SeqBoatLayerDevice> layers;
  SeqBoatLayerConfig lc = c.layer_config();
  lc.embed_dim = 8;
  lc.hdim = 16;
  SeqBoatLayer<float> l8(lc, 1);
  layers.push_back(cuda::SeqBoatLayerDevice::from_cpu(l8));
  CHECK_THROWS_WITH(cuda::SeqBoatLmDevice(mc, std::move(layers), {}, {}), Catch::Contains("embed_dim 8"));
}
