// sma_bench_cuda_lm: one AdamW training step (forward, token-level cross-entropy, backward, update) of a small causal
// SeqBoat LM on the device: V 256 (bytes), D 256, 4 layers (H 512, Z 128, N 16, W 256, simple bias, softmax,
// layernorm pre-norm) each with a silu feed-forward block of 512, B 16 x L 1024 tokens. Times each step with CUDA
// events (median of the repetitions after warm-up) in fp32, with bf16 projections, and with bf16 projections and
// bf16 attention, plus the forward alone, forward+loss+backward, the update, and the step and update with gradient
// clipping (AdamWConfig::clip_norm 1), and prints tokens per second.
// Usage: sma_bench_cuda_lm [reps=15] [B=16] [L=1024] [graph]. "graph": also the step recorded as one CUDA graph and
// replayed (set_step_graph; sma/cuda/step_graph.hpp), timed after the plain step on the same model.
#include "bench_lm_config.hpp"

#include <sma/cuda/benchmarking.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_lm.hpp>
#include <sma/models/lm.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace sma;

int main(int argc, char** argv) {
  if (!cuda::announce_device()) return 0;
  const int reps = cuda::positive_arg(argc, argv, 1, 15);
  const int B = cuda::positive_arg(argc, argv, 2, 16);
  const int L = cuda::positive_arg(argc, argv, 3, 1024);
  const bool graph = argc > 4 && std::string(argv[4]) == "graph";
  const SeqBoatLmConfig c = cuda_bench::bench_lm_config(std::max(1024, L));
  SeqBoatLm<float> cpu(c, 1);
  // A fresh device copy of the same initial model for each precision and lr = 0 (the update's work is the same),
  // so that every step routes the same tokens.
  cuda::SeqBoatLmDevice dev = cuda::SeqBoatLmDevice::from_cpu(cpu);
  cuda::AdamWConfig ac;
  std::mt19937 rng(7);
  std::vector<int> tok(static_cast<std::size_t>(B) * L), tgt(tok.size());
  for (int& t : tok) t = static_cast<int>(rng() % 256);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < L; ++t)
      tgt[static_cast<std::size_t>(b) * L + t] = t + 1 < L ? tok[static_cast<std::size_t>(b) * L + t + 1] : -100;
  cuda::DeviceArray<int> d_tok(tok), d_tgt(tgt);
  cuda::Stream stream;
  void* s = stream.handle();
  auto step = [&] { dev.train_step(B, L, d_tok.data(), nullptr, d_tgt.data(), 0.0, s); };
  auto fwd = [&] { dev.forward(B, L, d_tok.data(), nullptr, nullptr, s); };
  auto fwd_bwd = [&] {
    dev.forward(B, L, d_tok.data(), nullptr, nullptr, s);
    dev.loss(d_tgt.data(), -100, s);
    dev.backward_loss(s);
  };
  for (const int mode : {0, 1, 2}) {
    dev = cuda::SeqBoatLmDevice::from_cpu(cpu);
    dev.set_optimizer(ac);
    const char* prec = cuda::set_precision(dev, mode);
    const float t_step = cuda::time_median_ms(step, s, reps, 3);
    if (graph) cuda::time_step_graph(dev, step, s, reps, t_step, "lm", prec, B, L);
    const float t_fwd = cuda::time_median_ms(fwd, s, reps, 2);
    const float t_fb = cuda::time_median_ms(fwd_bwd, s, reps, 2);
    dev.zero_grad(s);
    const float t_opt = cuda::time_median_ms([&] { dev.step(0.0, s); }, s, reps, 2);
    cuda::AdamWConfig clipped = ac;
    clipped.clip_norm = 1.0;
    dev.set_optimizer(clipped);
    const float t_opt_clip = cuda::time_median_ms([&] { dev.step(0.0, s); }, s, reps, 2);
    const float t_step_clip = cuda::time_median_ms(step, s, reps, 2);
    dev.set_optimizer(ac);
    step();
    const cuda::CrossEntropyValue lv = dev.read_loss(s);
    double dens = 0;
    for (int i = 0; i < dev.n_layers(); ++i) dens += cuda::routed_share(dev.layer(i), s);
    std::printf("lm %s B=%d L=%d step %.3f ms (median of %d) = %.0f tokens/s | forward %.3f ms "
                "forward+loss+backward %.3f ms adamw %.3f ms | with clip_norm 1: step %.3f ms adamw %.3f ms | "
                "loss %.4f density %.3f\n",
                prec, B, L, t_step, reps, 1e3 * B * L / t_step, t_fwd, t_fb, t_opt, t_step_clip, t_opt_clip, lv.loss,
                dens / dev.n_layers());
  }
  return 0;
}
