// train_listops: SeqBoat on ListOps (Long Range Arena), generated on the fly: no download.
//
//   train_listops [steps=2000] [train_size=20000] [threads=2]
//
// Expressions such as "[MAX 4 3 [MIN 2 3 ] 1 0 ]" of 500 to 2000 tokens; the label is their value (10 classes).
// Batches are padded to their longest expression, and the padding mask keeps pads out of every layer.
#include <sma/data/listops.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/token_classifier.hpp>
#include <sma/train/trainer.hpp>

#include <cstdio>
#include <cstdlib>

using namespace sma;
using Model = train::TokenClassifier<float>;

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 2000;
  const Index n_train = argc > 2 ? std::atol(argv[2]) : 20000;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;

  const data::Splits lo = data::generate_listops_splits(n_train, 0, 2000, data::ListOpsConfig{}, /*seed=*/0);
  const Index max_len = 2000;

  train::TokenClassifierConfig cfg;  // an embedding in front of the reference's SeqBoatModel
  cfg.vocab_size = data::listops::vocab_size;
  cfg.padding_idx = data::listops::pad;
  cfg.model.d_input = 64;
  cfg.model.d_output = data::listops::num_classes;
  cfg.model.d_model = 64;
  cfg.model.n_layers = 2;
  cfg.model.d_qk = 32;
  cfg.model.d_ema = 8;
  cfg.model.mem_size = 64;
  cfg.model.dropout = 0.0;
  cfg.model.prenorm = true;
  cfg.model.norm_type = NormType::layernorm;
  cfg.model.max_positions = max_len;
  cfg.model.routing = RoutingSemantics::per_row;
  Model model(cfg, /*seed=*/1);

  train::TrainConfig tc;
  tc.steps = steps;
  tc.lr = 2e-3;
  tc.warmup = steps / 20;
  tc.threads = threads;
  train::Trainer<train::ClassificationTask<Model>> trainer(model, tc);

  train::EpochBatches<float> batches(lo.train, /*batch=*/16, tc.seed, max_len, data::PadTo::longest);
  train::FitOptions<data::Batch<float>> fit;
  fit.batch = [&](Index step) { return batches(step); };
  fit.checkpoint_path = "train_listops.safetensors";
  trainer.fit(fit);

  train::SequentialBatches<float> test_batches(lo.test, 32, max_len, data::PadTo::longest);
  const train::ShardResult r = trainer.evaluate(test_batches);
  std::printf("test accuracy %.2f%% (%lld expressions), activation density per layer %s\n", 100 * r.accuracy(),
              static_cast<long long>(r.counted), train::format_density(r.activity.densities()).c_str());
}
