// train_fashion_mnist: the reference SeqBoat classifier on sequential Fashion-MNIST, in a few lines.
//
//   train_fashion_mnist [steps=1200] [threads=2]
//
// Each 28x28 image is read as a sequence of 196 tokens of 2x2 pixels. Data: Debian's dataset-fashion-mnist.
#include <sma/data/mnist.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/patches.hpp>
#include <sma/train/trainer.hpp>

#include <cstdio>
#include <cstdlib>

using namespace sma;
using Model = SeqBoatModel<float>;

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 1200;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;

  data::ImageOptions images;
  images.normalize = true;
  const data::Dataset train = train::to_patches(data::load_fashion_mnist(data::Split::train, images), 2);
  const data::Dataset test = train::to_patches(data::load_fashion_mnist(data::Split::test, images), 2);
  const Index L = 196;

  SeqBoatModelConfig mc;  // the reference's SeqBoatModel arguments
  mc.d_input = 4;         // 2x2 pixels per token
  mc.d_output = 10;
  mc.d_model = 64;
  mc.n_layers = 2;
  mc.d_qk = 32;
  mc.d_ema = 8;
  mc.mem_size = 32;
  mc.dropout = 0.0;
  mc.prenorm = true;
  mc.norm_type = NormType::layernorm;
  mc.max_positions = L;
  mc.routing = RoutingSemantics::per_row;
  Model model(mc, /*seed=*/1);

  train::TrainConfig tc;  // AdamW, linear warm-up then cosine decay, clipping at 1
  tc.steps = steps;
  tc.lr = 3e-3;
  tc.warmup = steps / 20;
  tc.threads = threads;
  tc.seed = 1;
  train::Trainer<train::ClassificationTask<Model>> trainer(model, tc);

  train::EpochBatches<float> batches(train, /*batch=*/32, tc.seed, L);
  train::FitOptions<data::Batch<float>> fit;
  fit.batch = [&](Index step) { return batches(step); };
  fit.checkpoint_path = "train_fashion_mnist.safetensors";  // resume with trainer.resume(path)
  trainer.fit(fit);

  train::SequentialBatches<float> test_batches(test, 100, L);
  const train::ShardResult r = trainer.evaluate(test_batches);
  std::printf("test accuracy %.2f%% (%lld images), activation density per layer %s\n", 100 * r.accuracy(),
              static_cast<long long>(r.counted), train::format_density(r.activity.densities()).c_str());
}
