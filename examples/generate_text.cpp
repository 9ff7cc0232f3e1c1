// generate_text: character-level text generation with a causal SeqBoat language model, decoded token by token from a
// fixed-size streaming state (sma/models/lm.hpp, docs/streaming.md).
//
//   generate_text --checkpoint sma-demo-kjv-lm.safetensors --prompt "And God said" --length 300 --top-k 8
//   generate_text --train-steps 300 --save tiny-lm.safetensors     # no checkpoint yet: train a tiny LM first
//
// The checkpoint is either the training run's (sma-demo --task kjv-lm writes <out-dir>/sma-demo-kjv-lm.safetensors,
// with the model configuration in its metadata) or one written by this program (--save). The vocabulary is the King
// James Bible's characters (sma/data/kjv.hpp), or the checkpoint's "vocab" metadata when it has one. Without a
// checkpoint the program trains a small LM on the KJV text for --train-steps steps (AdamW, batches of 8 windows of
// 128 characters, about half a CPU-second a step here), so that it runs end to end on a fresh machine;
// --train-steps 0 keeps the random initial weights (the text is then noise, which the program says).
//
// It also parks the conversation halfway (saves the stream state to bytes), resumes it from those bytes, and checks
// that the continuation is the same as without the pause.
#include <sma/data/kjv.hpp>
#include <sma/models/lm.hpp>
#include <sma/optim/adam.hpp>
#include <sma/optim/optimizer.hpp>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

using namespace sma;
using T = float;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// A small LM trained from scratch on the KJV training text: enough to produce word-like text.
SeqBoatLm<T> train_tiny_lm(const data::CharCorpus& kjv, Index steps, std::uint64_t seed) {
  SeqBoatLmConfig c;
  c.vocab_size = kjv.vocab.size();
  c.embed_dim = 64;
  c.hidden_dim = 128;
  c.zdim = 32;
  c.ndim = 8;
  c.ffn_hidden_dim = 128;
  c.layers = 2;
  c.window_size = 32;
  c.max_positions = 128;
  SeqBoatLm<T> lm(c, seed);
  if (steps == 0) return lm;
  ParamBuffer<T> buf(lm);
  optim::Adam<T> opt(buf, optim::Adam<T>::Config{0.9, 0.98, 1e-8, 0.01});
  optim::Schedule sched{3e-3, std::max<Index>(1, steps / 20), steps, optim::Decay::cosine, 0.1};
  data::LmBatcher batches(kjv.train, 8, 128, seed);
  Context ctx(Mode::train, seed);
  const auto t0 = Clock::now();
  double avg = 0;
  for (Index s = 0; s < steps; ++s) {
    const data::LmBatch b = batches.next();
    buf.zero_grad();
    typename SeqBoatLm<T>::Cache cache;
    const auto r = lm.loss(ctx, b.inputs, b.flat_targets(), cache, true);
    optim::clip_grad_norm(buf, 1.0);
    opt.step(sched.lr(s));
    avg = s == 0 ? r.loss : 0.95 * avg + 0.05 * r.loss;
    if ((s + 1) % 50 == 0 || s + 1 == steps)
      std::fprintf(stderr, "  step %lld/%lld  loss %.3f bits/char  (%.0f s)\n", static_cast<long long>(s + 1),
                   static_cast<long long>(steps), data::bits_per_char(avg), seconds_since(t0));
  }
  // The parameters live in `buf`, which dies here: return a deep copy (copying a Param copies its values).
  return SeqBoatLm<T>(static_cast<const SeqBoatLm<T>&>(lm));
}

std::string printable(const std::string& s) {
  std::string o;
  for (char ch : s) o += ch == '\n' ? std::string("\n  ") : std::string(1, ch);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Generate text with a causal SeqBoat character LM, streaming one token at a time"};
  std::string checkpoint = "sma-demo-kjv-lm.safetensors", save, prompt = "And God said, ";
  Index length = 300, top_k = 10, train_steps = 300;
  double temperature = 0.8;
  std::uint64_t seed = 1;
  bool greedy = false;
  app.add_option("--checkpoint", checkpoint, "LM checkpoint (safetensors); trained from scratch when the file is absent")
      ->capture_default_str();
  app.add_option("--prompt", prompt, "text to continue")->capture_default_str();
  app.add_option("--length", length, "characters to generate")->capture_default_str();
  app.add_option("--temperature", temperature, "sampling temperature (0 = greedy)")->capture_default_str();
  app.add_option("--top-k", top_k, "sample among the k most likely characters (0 = all)")->capture_default_str();
  app.add_flag("--greedy", greedy, "always take the most likely character");
  app.add_option("--seed", seed, "sampling (and training) seed")->capture_default_str();
  app.add_option("--train-steps", train_steps, "without a checkpoint: training steps of the tiny LM (0 = random weights)")
      ->capture_default_str();
  app.add_option("--save", save, "write the trained tiny LM to this checkpoint");
  CLI11_PARSE(app, argc, argv);

  try {
    if (length < 2) throw ValueError(str_cat("--length must be >= 2 (it is split around a pause), got ", length));
    std::printf("loading the King James Bible text (vocabulary%s)...\n",
                std::filesystem::exists(checkpoint) ? "" : " and training text");
    const data::CharCorpus kjv = data::load_kjv_corpus();
    data::CharVocab vocab = kjv.vocab;

    SeqBoatLm<T> lm;
    bool trained = true;
    if (std::filesystem::exists(checkpoint)) {
      auto ck = load_lm_checkpoint<T>(checkpoint);
      lm = std::move(ck.model);
      if (ck.metadata.count("vocab")) vocab = data::CharVocab::from_text(ck.metadata.at("vocab"));
      std::printf("loaded %s (%lld layers, D = %lld)\n", checkpoint.c_str(), static_cast<long long>(lm.num_layers()),
                  static_cast<long long>(lm.config().embed_dim));
    } else {
      std::printf("no checkpoint at %s: training a tiny LM for %lld steps on the KJV text\n", checkpoint.c_str(),
                  static_cast<long long>(train_steps));
      lm = train_tiny_lm(kjv, train_steps, seed);
      trained = train_steps > 0;
      if (!save.empty()) {
        save_lm_checkpoint(lm, save, {{"vocab", kjv.vocab.symbols()}});
        std::printf("saved %s\n", save.c_str());
      }
    }
    if (vocab.size() != lm.config().vocab_size)
      throw ValueError(str_cat("the model has ", lm.config().vocab_size, " symbols but the vocabulary ", vocab.size()));
    if (!trained) std::printf("(random weights: the text below is noise)\n");

    std::vector<std::int32_t> ids;
    for (unsigned char ch : prompt) {
      if (!vocab.contains(ch)) throw ValueError(str_cat("the prompt's character '", char(ch), "' is not in the vocabulary"));
      ids.push_back(vocab.id(ch));
    }
    SamplingOptions so;
    so.temperature = greedy ? 0.0 : temperature;
    so.top_k = top_k;
    so.seed = seed;

    SeqBoatLmStreamer<T> streamer(lm);
    auto st = streamer.make_state(1);
    const auto t0 = Clock::now();
    const Index first = length / 2;
    const auto part1 = generate(streamer, st, ids, first, so);
    const double s1 = seconds_since(t0);

    // Park the conversation (its whole state as bytes), then resume it from the bytes. The state holds everything
    // but the last generated character, which starts the continuation.
    const std::int64_t parked_at = st.position[0];
    const std::vector<std::uint8_t> parked = streamer.save_state(st);
    auto resumed = streamer.load_state(parked);
    SamplingOptions so2 = so;
    so2.seed = seed + 1000;
    const auto t1 = Clock::now();
    const auto part2 = generate(streamer, resumed, {part1.back()}, length - first, so2);
    const double s2 = seconds_since(t1);
    const auto check = generate(streamer, st, {part1.back()}, length - first, so2);

    std::vector<std::int32_t> all = part1;
    all.insert(all.end(), part2.begin(), part2.end());
    std::printf("\n  %s%s\n\n", printable(prompt).c_str(), printable(vocab.decode(all)).c_str());
    std::printf("%lld characters in %.3f s (%.0f characters/s after the prompt), streaming state %zu bytes "
                "(independent of the position), parked and resumed at position %lld: continuation %s\n",
                static_cast<long long>(length), s1 + s2, double(length) / (s1 + s2), st.bytes(),
                static_cast<long long>(parked_at),
                check == part2 ? "identical" : "DIFFERENT");
    return check == part2 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate_text: %s\n", e.what());
    return 1;
  }
}
