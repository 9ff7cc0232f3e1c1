// train_kjv_lm: a causal character language model on the King James Bible (Debian: bible-kjv, bible-kjv-text):
// SeqBoat layers each followed by a feed-forward block (SeqBoatLm, sma/models/lm.hpp), next-character
// cross-entropy, test bits per character.
//
//   train_kjv_lm [steps=2000] [seq_len=256] [threads=2]
//
// Then: generate_text --checkpoint train_kjv_lm.safetensors --prompt "And God said"
#include <sma/data/kjv.hpp>
#include <sma/models/lm.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/trainer.hpp>

#include <cstdio>
#include <cstdlib>

using namespace sma;
using Model = SeqBoatLm<float>;

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 2000;
  const Index seq_len = argc > 2 ? std::atol(argv[2]) : 256;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;

  const data::CharCorpus kjv = data::load_kjv_corpus();  // 90/5/5 contiguous split, 63 symbols

  SeqBoatLmConfig cfg;
  cfg.vocab_size = kjv.vocab.size();
  cfg.embed_dim = 64;
  cfg.hidden_dim = 128;
  cfg.zdim = 32;
  cfg.ndim = 8;
  cfg.ffn_hidden_dim = 128;
  cfg.layers = 2;
  cfg.window_size = 64;
  cfg.max_positions = seq_len;
  Model model(cfg, /*seed=*/1);

  train::TrainConfig tc;
  tc.steps = steps;
  tc.lr = 3e-3;
  tc.warmup = steps / 20;
  tc.threads = threads;
  train::Trainer<train::LanguageModelTask<Model>> trainer(model, tc);

  train::StreamBatches batches(kjv.train, /*batch=*/16, seq_len, tc.seed);  // random windows, a function of the step
  train::FitOptions<data::LmBatch> fit;
  fit.batch = [&](Index step) { return batches(step); };
  fit.checkpoint_path = "train_kjv_lm.safetensors";
  fit.checkpoint_metadata = [&] { return std::map<std::string, std::string>{{"model_config", cfg.to_json().dump()}}; };
  trainer.fit(fit);

  const std::vector<std::int32_t> test(kjv.test.begin(), kjv.test.begin() + 100000);  // the first 100k characters
  data::LmSequentialBatcher test_batches(test, 16, seq_len);
  const train::ShardResult r = trainer.evaluate([&](data::LmBatch& b) { return test_batches.next(b); });
  std::printf("test: %.3f bits per character (%lld characters), activation density per layer %s\n",
              data::bits_per_char(r.loss()), static_cast<long long>(r.counted),
              train::format_density(r.activity.densities()).c_str());
}
