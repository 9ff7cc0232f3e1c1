// sma_bench_cuda_model: one AdamW training step (forward, softmax cross-entropy, backward, update) of the SeqBoat
// classifier on the device, at the official CIFAR quickstart configuration: 8 layers, D 160, Z 96, H 320, N 16,
// W 128, batchnorm post-norm, simple bias (max_positions 1024), bidirectional, relu2, B 50 x L 1024, d_input 3,
// d_output 10; dropout 0, or the quickstart's 0.1 with SMA_BENCH_DROPOUT=0.1 (the device layers draw their masks
// themselves). Times each step with CUDA events (median of the repetitions
// after warm-up), in fp32, with bf16 projections, and with bf16 projections and bf16 attention, plus the forward alone and the step's parts.
// Usage: sma_bench_cuda_model [reps=15] [profile [mode] | graph]. "profile": 1 warm-up step and 1 step in one
// precision (mode 0 fp32, 1 bf16 projections, 2 and bf16 attention), for nsys/ncu. "graph": also the step recorded
// as one CUDA graph and replayed (set_step_graph; sma/cuda/step_graph.hpp), timed after the plain step on the same
// model, and the loss of both after one more step each (they should be equal).
#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_model.hpp>
#include <sma/models/seqboat.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace sma;

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const int reps = cuda::positive_arg(argc, argv, 1, 15);
  const bool profile = argc > 2 && std::string(argv[2]) == "profile";
  const int profile_mode = argc > 3 ? std::atoi(argv[3]) : 0;  // 0 fp32, 1 bf16 projections, 2 + bf16 attention
  const bool graph = argc > 2 && std::string(argv[2]) == "graph";
  SeqBoatModelConfig c;
  c.d_input = 3;
  c.d_output = 10;
  c.d_model = 160;
  c.n_layers = 8;
  c.dropout = std::getenv("SMA_BENCH_DROPOUT") ? std::atof(std::getenv("SMA_BENCH_DROPOUT")) : 0.0;
  c.prenorm = false;
  c.max_positions = 1024;
  c.d_qk = 96;
  c.d_ema = 16;
  c.mem_size = 128;
  c.bidirectional = true;
  c.norm_type = NormType::batchnorm;
  c.rel_pos = ops::PositionEncoding::simple;
  c.attention_activation = ops::AttentionActivation::relu2;
  const int B = 50, L = 1024;
  SeqBoatModel<float> cpu(c, 1);
  // A fresh device copy of the same initial model for each precision, and lr = 0 (the update's work is the same),
  // so that every step routes the same tokens: the density, which sets much of the cost, stays the initial one.
  cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(cpu);
  cuda::AdamWConfig ac;  // sma::train defaults: betas 0.9 / 0.98, weight decay 0.01 on matrices
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(static_cast<std::size_t>(B) * L * c.d_input);
  for (float& v : x) v = nd(rng);
  std::vector<int> y(B);
  for (int& v : y) v = static_cast<int>(rng() % 10);
  cuda::DeviceArray<float> d_x(x);
  cuda::DeviceArray<int> d_y(y);
  cuda::Stream stream;
  void* s = stream.handle();
  const double lr = 0.0;
  auto step = [&] { dev.train_step(B, L, d_x.data(), nullptr, d_y.data(), lr, s); };
  auto fwd = [&] { dev.forward(B, L, d_x.data(), nullptr, nullptr, s); };
  auto fwd_bwd = [&] {
    dev.forward(B, L, d_x.data(), nullptr, nullptr, s);
    dev.loss(d_y.data(), -100, s);
    dev.backward_loss(nullptr, s);
  };
  for (const int mode : {0, 1, 2}) {
    dev = cuda::SeqBoatModelDevice::from_cpu(cpu);
    dev.set_optimizer(ac);
    const char* prec = cuda::set_precision(dev, mode);
    if (profile) {
      if (mode != profile_mode) continue;
      step();
      cuda::device_synchronize();
      cuda::EventTimer t;
      t.start(s);
      step();
      std::printf("profile %s step %.3f ms\n", prec, t.stop(s));
      continue;
    }
    const float t_step = cuda::time_median_ms(step, s, reps, 3);
    if (graph) cuda::time_step_graph(dev, step, s, reps, t_step, "model", prec, B, L);
    const float t_fwd = cuda::time_median_ms(fwd, s, reps, 2);
    const float t_fb = cuda::time_median_ms(fwd_bwd, s, reps, 2);
    dev.zero_grad(s);
    const float t_opt = cuda::time_median_ms([&] { dev.step(0.0, s); }, s, reps, 2);
    step();
    const cuda::CrossEntropyValue lv = dev.read_loss(s);
    double dens = 0;
    std::string per;
    for (int i = 0; i < dev.n_layers(); ++i) {
      const double share = cuda::routed_share(dev.layer(i), s);
      dens += share;
      per += (i ? "," : "") + std::to_string(share).substr(0, 5);
    }
    std::printf("model %s B=%d L=%d step %.3f ms (median of %d) forward %.3f ms forward+loss+backward %.3f ms "
                "adamw %.3f ms | loss %.4f density %.3f [%s] dropout %.2f\n",
                prec, B, L, t_step, reps, t_fwd, t_fb, t_opt, lv.loss, dens / dev.n_layers(), per.c_str(), c.dropout);
  }
  return 0;
}
