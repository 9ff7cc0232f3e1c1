// SeqBoatModelDevice against the CPU SeqBoatModel (double reference, float CPU path for the error budget), in train
// mode with ragged padding: logits, loss, every parameter gradient, batchnorm's running statistics, and the
// parameters after 3 AdamW steps (train_step on the device, sma::train::Optimizer on the CPU; also 2 SGD steps with
// Nesterov momentum and 3 RAdam steps, DeviceOptimizer). Configurations: batchnorm post-norm bidirectional (simple
// bias, relu2) and layernorm pre-norm causal rotary softmax. The router margins are widened as in
// test_cuda_seqboat_layer.cpp so that no decision is a near tie.
#include "cuda_test_support.hpp"
#include "model_test_support.hpp"

#include <sma/cuda/seqboat_model.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/optim/loss.hpp>
#include <sma/train/optimizer.hpp>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

// The accuracy rule with a floor of 1e-5 x max|reference| (the layer tests use 2e-6): the model chains two layers,
// batchnorm statistics and the pooling, whose sums the device and the float CPU path take in different orders.
constexpr double kFloor = 1e-5;

/// Trains `steps` steps with `kind` (SGD with Nesterov momentum) after the gradient checks.
void check_model(const char* name, const SeqBoatModelConfig& cfg, unsigned seed,
                 train::OptimizerKind kind = train::OptimizerKind::adamw, int steps = 3) {
  INFO("model case " << name << ", " << train::to_string(kind));
  SeqBoatModel<double> md(cfg, seed);
  SeqBoatModel<float> mf(cfg, seed);
  auto pd = cuda_test::params_of<double>(md);
  auto pf = cuda_test::params_of<float>(mf);
  std::mt19937 rng(seed * 7 + 1);
  std::normal_distribution<double> nd(0.0, 1.0);
  const Index D = cfg.d_model;
  for (Index l = 0; l < cfg.n_layers; ++l)
    cuda_test::widen_router_margin(pd, str_cat("seq_layers.", l, "."), D, rng, nd);
  cuda_test::share_values(pd, pf);
  const int B = 3, L = 45, Di = static_cast<int>(cfg.d_input), C = static_cast<int>(cfg.d_output);
  Tensor3<double> x(B, L, Di);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(nd(rng));
  const Tensor3<float> xf = x.cast<float>();
  const auto [mask, flat] = cuda_test::row_tail_padding(B, L);
  const std::vector<std::int64_t> labels{1, 4, 0};
  const std::vector<int> labels32(labels.begin(), labels.end());

  cuda::Stream stream;
  void* s = stream.handle();
  cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(mf);  // before the CPU forwards (running stats)
  REQUIRE(dev.training());
  cuda::DeviceArray<float> d_x(std::vector<float>(xf.data(), xf.data() + xf.size()));
  cuda::DeviceArray<std::uint8_t> d_mask(flat);
  cuda::DeviceArray<int> d_labels(labels32);
  cuda::DeviceArray<float> d_logits(static_cast<std::size_t>(B * C));

  Context ctx(Mode::train);
  ctx.padding = &mask;
  typename SeqBoatModel<double>::Cache cd;
  typename SeqBoatModel<float>::Cache cf;
  auto cpu_step = [&](auto& model, const auto& xin, auto& cache) {
    using T = typename std::decay_t<decltype(model)>::Scalar;
    zero_grad(model);
    const Tensor2<T> y = model.forward(ctx, xin, cache);
    Matrix<T> dl;
    const optim::LossResult r = optim::cross_entropy<T>(as_matrix(y), labels, &dl);
    Tensor2<T> dlt(B, C);
    as_matrix(dlt) = dl;
    model.backward(ctx, dlt, cache);
    return std::make_pair(y, r.loss);
  };
  const auto [yd, lossd] = cpu_step(md, x, cd);
  const auto [yf, lossf] = cpu_step(mf, xf, cf);

  dev.forward(B, L, d_x.data(), d_mask.data(), d_logits.data(), s);
  dev.loss(d_labels.data(), -100, s);
  dev.backward_loss(nullptr, s);
  const cuda::CrossEntropyValue lv = dev.read_loss(s);
  stream.synchronize();

  cuda_test::require_same_routing(cd, dev, B, L, s, "");
  cuda_test::check_logits_and_loss(d_logits, yf, yd, lv, lossd, lossf, B, kFloor);
  cuda_test::check_gradients(dev, pd, pf, s, kFloor);  // buffers: the running statistics after the forward

  // `steps` steps (sma::train::Optimizer's rule: decay on matrices only) from here.
  const std::map<std::string, std::vector<double>> w0 = cuda_test::snapshot(pd);
  cuda_test::CpuOptimizer cpu_opt(md, mf, kind);
  cpu_opt.set_on(dev);
  pd = cuda_test::params_of<double>(md);
  pf = cuda_test::params_of<float>(mf);
  const double lr = 2e-3;
  for (int step = 0; step < steps; ++step) {
    cpu_step(md, x, cd);
    cpu_step(mf, xf, cf);
    cpu_opt.step(lr);
    dev.train_step(B, L, d_x.data(), d_mask.data(), d_labels.data(), lr, s);
  }
  stream.synchronize();
  cuda_test::require_same_routing(cd, dev, B, L, s, "after training, ");
  CHECK(dev.optimizer().steps() == steps);
  CHECK(dev.optimizer().kind() == cuda::parse_device_optimizer(train::to_string(kind)));
  cuda_test::check_params_after_steps(dev, pd, pf, w0, s, steps);
}

}  // namespace

TEST_CASE("cuda SeqBoat model matches the CPU model (forward, loss, gradients, AdamW)", "[cuda][model][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  {
    SeqBoatModelConfig c = cuda_test::small_model_config();
    c.norm_type = NormType::batchnorm;
    c.prenorm = false;
    c.bidirectional = true;
    check_model("batchnorm postnorm bidirectional simple relu2, ragged", c, 3);
  }
  {
    SeqBoatModelConfig c = cuda_test::small_model_config();
    c.norm_type = NormType::layernorm;
    c.prenorm = true;
    c.bidirectional = false;
    c.rel_pos = ops::PositionEncoding::rotary;
    c.attention_activation = ops::AttentionActivation::softmax;
    check_model("layernorm prenorm causal rotary softmax, ragged", c, 4);
  }
  {
    SeqBoatModelConfig c = cuda_test::small_model_config();
    c.norm_type = NormType::batchnorm;
    c.prenorm = true;  // the final norm is a batchnorm too
    c.bidirectional = false;
    check_model("batchnorm prenorm causal (batchnorm final norm), ragged", c, 5);
  }
}

TEST_CASE("cuda SeqBoat model trains with SGD and RAdam as the CPU does", "[cuda][model][optim]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatModelConfig c = cuda_test::small_model_config();
  c.norm_type = NormType::batchnorm;
  c.prenorm = false;
  c.bidirectional = true;
  check_model("batchnorm postnorm bidirectional simple relu2, ragged", c, 3, train::OptimizerKind::sgd, 2);
  c = cuda_test::small_model_config();
  c.norm_type = NormType::layernorm;
  c.prenorm = true;
  c.bidirectional = false;
  c.rel_pos = ops::PositionEncoding::rotary;
  c.attention_activation = ops::AttentionActivation::softmax;
  check_model("layernorm prenorm causal rotary softmax, ragged", c, 4, train::OptimizerKind::radam, 3);
}

TEST_CASE("cuda SeqBoat model in eval mode uses the running statistics", "[cuda][model][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatModelConfig c = cuda_test::small_model_config();
  c.norm_type = NormType::batchnorm;
  SeqBoatModel<float> m(c, 9);
  // running statistics away from 0 / 1 so that eval differs from train; router logits widened (no near ties)
  for_each_param(m, [&](const std::string& n, Param<float>& p) {
    if (n.find("hx_proj.weight") != std::string::npos)
      for (Index i = 0; i < 2 * c.d_model; ++i) p.data()[i] *= 5.f;
    if (n.find("running_mean") != std::string::npos) p.fill(0.3f);
    if (n.find("running_var") != std::string::npos) p.fill(2.0f);
  });
  cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(m);
  dev.set_training(false);
  const int B = 2, L = 30;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  Tensor3<float> x(B, L, c.d_input);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = nd(rng);
  cuda::DeviceArray<float> d_x(std::vector<float>(x.data(), x.data() + x.size()));
  cuda::DeviceArray<float> d_y(static_cast<std::size_t>(B * c.d_output));
  cuda::Stream stream;
  dev.forward(B, L, d_x.data(), nullptr, d_y.data(), stream.handle());
  Context ctx(Mode::eval);
  typename SeqBoatModel<float>::Cache cache;
  const Tensor2<float> y = m.forward(ctx, x, cache);
  const std::vector<float> got = d_y.download(stream.handle());
  const double scale = cuda_test::max_abs(y.data(), got.size());
  CHECK(cuda_test::max_abs_diff(got.data(), y.data(), got.size()) <= 1e-4 * std::max(scale, 1.0));
  // eval mode leaves the running statistics alone
  const std::vector<float> rm = dev.param("seq_layers.0.norm.norm.running_mean", stream.handle());
  for (float v : rm) CHECK(v == 0.3f);
}

TEST_CASE("cuda SeqBoat model: unsupported configurations and misuse", "[cuda][model][quick]") {
  SMA_CUDA_TEST_REQUIRE_DEVICE();
  SeqBoatModelConfig c = cuda_test::small_model_config();
  c.dropout = 0.1;  // the layers' dropout is on the device (test_cuda_seqboat_layer.cpp, test_cuda_step_graph.cpp)
  SeqBoatModel<float> dr(c, 1);
  CHECK(cuda::SeqBoatModelDevice::from_cpu(dr).layer(0).config().dropout == 0.1f);
  CHECK(cuda::SeqBoatModelDevice::from_cpu(dr, true).layer(0).config().dropout == 0.f);
  c = cuda_test::small_model_config();
  c.d_qk = 160;
  SeqBoatModel<float> wide(c, 1);
  CHECK_THROWS_WITH(cuda::SeqBoatModelDevice::from_cpu(wide), Catch::Contains("zdim 160"));
  c = cuda_test::small_model_config();
  SeqBoatModel<float> ok(c, 1);
  cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(ok);
  CHECK_THROWS_WITH(dev.backward_loss(), Catch::Contains("no forward"));
  CHECK_THROWS_WITH(dev.forward(0, 4, nullptr, nullptr), Catch::Contains("must be >= 1"));
  CHECK_THROWS_AS(dev.grad("nope"), KeyError);
  cuda::DeviceArray<float> x(std::vector<float>(static_cast<std::size_t>(2 * 4 * c.d_input), 0.f));
  CHECK_THROWS_WITH(dev.train_step(2, 4, x.data(), nullptr, nullptr, 1e-3), Catch::Contains("no optimiser"));
  // A label outside [0, d_output): the loss is read back as an error naming it.
  cuda::Stream stream;
  dev.forward(2, 4, x.data(), nullptr, nullptr, stream.handle());
  cuda::DeviceArray<int> bad(std::vector<int>{1, 7});
  dev.loss(bad.data(), -100, stream.handle());
  CHECK_THROWS_WITH(dev.read_loss(stream.handle()), Catch::Contains("label 7 at row 1"));
  // A CPU model of another shape cannot take the device gradients.
  SeqBoatModelConfig c2 = cuda_test::small_model_config();
  c2.d_output = 7;
  SeqBoatModel<float> other(c2, 1);
  CHECK_THROWS_AS(dev.add_grads_to(other), ShapeError);
  // A layer of another width cannot join the model.
  cuda::SeqBoatModelDeviceConfig mc;
  mc.d_input = 3;
  mc.d_output = 5;
  mc.d_model = 24;
  CHECK_THROWS_WITH(cuda::SeqBoatModelDevice(mc, cuda_test::narrow_layers(c.layer_config()), {}, {}),
                    Catch::Contains("embed_dim 8"));
}
