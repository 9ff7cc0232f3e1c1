// train_gpu: the SeqBoat classifier trained on the GPU (sma::cuda::SeqBoatModelDevice): sequential Fashion-MNIST
// read pixel by pixel (L = 784), AdamW with warm-up and cosine decay, every step queued on one stream with no
// wait for the host. Built when the CUDA backend is (docs/cuda.md); without a GPU it says so and exits.
//
//   train_gpu [steps=1500] [batch=64] [bf16=0] [graph=1] [dropout=0]
//
// bf16=1 runs the projections and the attention on tensor cores (fp32 accumulation, fp32 EMA and norms).
// graph=1 records the training step once as a CUDA graph and replays it (set_step_graph: the same bits as plain
// steps, without the launch gaps; x and y stay at the same device addresses, so one capture serves every step).
// dropout: the layers' dropout rate in training (masks drawn on the device, fresh at every step, graph or not).
// Data: Debian's dataset-fashion-mnist (or SMA_FASHION_MNIST_DIR).
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/seqboat_model.hpp>
#include <sma/data/mnist.hpp>
#include <sma/train/batches.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace sma;

namespace {

// Linear warm-up, then cosine decay to 0 (the schedule of sma::train::Trainer).
double learning_rate(Index step, Index steps, double peak) {
  const Index warmup = std::max<Index>(1, steps / 20);
  if (step < warmup) return peak * double(step + 1) / double(warmup);
  const double t = double(step - warmup) / double(std::max<Index>(1, steps - warmup));
  return peak * 0.5 * (1 + std::cos(3.141592653589793 * t));
}

std::vector<int> labels_of(const data::Batch<float>& b) { return std::vector<int>(b.labels.begin(), b.labels.end()); }

}  // namespace

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 1500;
  const int batch = argc > 2 ? std::atoi(argv[2]) : 64;
  const bool bf16 = argc > 3 && std::atoi(argv[3]) != 0;
  const bool graph = argc <= 4 || std::atoi(argv[4]) != 0;
  const double dropout = argc > 5 ? std::atof(argv[5]) : 0.0;
  if (cuda::device_count() == 0) {
    std::printf("train_gpu: no CUDA device, nothing to train (docs/cuda.md)\n");
    return 0;
  }
  std::printf("device: %s\n", cuda::device_description(0).c_str());

  data::ImageOptions images;
  images.normalize = true;
  const data::Dataset train = data::load_fashion_mnist(data::Split::train, images);
  const data::Dataset test = data::load_fashion_mnist(data::Split::test, images);
  const Index L = 784;  // one pixel per token

  SeqBoatModelConfig mc;  // the reference's SeqBoatModel arguments
  mc.d_input = 1;
  mc.d_output = 10;
  mc.d_model = 128;
  mc.n_layers = 4;
  mc.d_qk = 64;
  mc.d_ema = 16;
  mc.mem_size = 128;
  mc.dropout = dropout;
  mc.prenorm = true;
  mc.norm_type = NormType::layernorm;
  mc.max_positions = L;
  SeqBoatModel<float> cpu(mc, /*seed=*/1);

  cuda::SeqBoatModelDevice model = cuda::SeqBoatModelDevice::from_cpu(cpu);
  model.set_bf16_projections(bf16);
  model.set_bf16_attention(bf16);
  cuda::AdamWConfig opt;
  opt.weight_decay = 0.01;
  model.set_optimizer(opt);
  model.set_step_graph(graph);

  cuda::Stream stream;
  void* s = stream.handle();
  cuda::DeviceArray<float> x(static_cast<std::size_t>(batch) * L);
  cuda::DeviceArray<int> y(static_cast<std::size_t>(batch));

  train::EpochBatches<float> batches(train, batch, /*seed=*/1, L);
  const auto t0 = std::chrono::steady_clock::now();
  double seen_loss = 0;
  int seen = 0;
  for (Index step = 0; step < steps; ++step) {
    const data::Batch<float> b = batches(step);
    x.upload(std::vector<float>(b.values.data(), b.values.data() + b.values.size()), s);
    y.upload(labels_of(b), s);
    model.train_step(batch, static_cast<int>(L), x.data(), nullptr, y.data(), learning_rate(step, steps, 2e-3), s);
    if ((step + 1) % 100 == 0 || step + 1 == steps) {
      seen_loss += model.read_loss(s).loss;  // the only wait for the host, every 100 steps
      ++seen;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("step %5lld  loss %.4f  %.2f ms/step  %.0fk tokens/s\n", static_cast<long long>(step + 1),
                  seen_loss / seen, 1e3 * secs / double(step + 1), double(step + 1) * batch * L / secs / 1e3);
      seen_loss = 0;
      seen = 0;
    }
  }

  model.set_step_graph(false);
  model.set_training(false);
  train::SequentialBatches<float> test_batches(test, 500, L);
  Index correct = 0, counted = 0;
  data::Batch<float> b;
  while (test_batches(b)) {
    const int n = static_cast<int>(b.size());
    cuda::DeviceArray<float> xt(std::vector<float>(b.values.data(), b.values.data() + b.values.size()));
    cuda::DeviceArray<float> logits(static_cast<std::size_t>(n) * 10);
    model.forward(n, static_cast<int>(L), xt.data(), nullptr, logits.data(), s);
    const std::vector<float> z = logits.download(s);
    for (int r = 0; r < n; ++r) {
      int best = 0;
      for (int c = 1; c < 10; ++c)
        if (z[static_cast<std::size_t>(r) * 10 + c] > z[static_cast<std::size_t>(r) * 10 + best]) best = c;
      correct += best == b.labels[static_cast<std::size_t>(r)];
      ++counted;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("test accuracy %.2f%% (%lld images), %.1f s in all, %s\n", 100.0 * double(correct) / double(counted),
              static_cast<long long>(counted), secs, bf16 ? "bf16" : "fp32");
  if (graph) {
    const cuda::StepGraphStats g = model.step_graph_stats();
    std::printf("step graph: %lld plain steps, %lld captures, %lld replays\n", g.plain, g.captures, g.replays);
  }
}
