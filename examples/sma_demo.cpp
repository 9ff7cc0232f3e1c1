// sma-demo: trains a small SeqBoat model end to end on data that needs no download, then shows what it learned.
//
//   sma-demo                                   # sequential Fashion-MNIST, 1200 steps, about 82% test accuracy in 2 minutes on 2 cores
//   sma-demo --task listops --steps 2000       # or mnist, spam, kjv-lm
//   sma-demo --steps 3000 --resume             # continue the last run (its checkpoint) up to step 3000
//
// It prints a progress bar (step, loss, accuracy, tokens per second, activation density per layer, time left), the
// test accuracy (bits per character for kjv-lm), the learned density per layer, and a table comparing the time and
// memory of the trained model with its learned sparse routing and with every token activated. It writes two
// pictures: the training curves, and the activation pattern (which positions each layer routed to attention).
#include "alloc_counter.hpp"
#include "svg.hpp"

#include <sma/data/char_lm.hpp>
#include <sma/data/dataset.hpp>
#include <sma/data/kjv.hpp>
#include <sma/data/listops.hpp>
#include <sma/data/mnist.hpp>
#include <sma/data/spam_assassin.hpp>
#include <sma/io/npy.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/model_config.hpp>
#include <sma/train/patches.hpp>
#include <sma/train/token_classifier.hpp>
#include <sma/train/trainer.hpp>
#if __has_include(<sma/models/lm.hpp>)
#include <sma/models/lm.hpp>
#define SMA_DEMO_HAS_LM 1
#endif

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <map>
#include <string>
#include <sys/resource.h>
#include <vector>

namespace {

using namespace sma;
using T = float;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

const Clock::time_point g_start = Clock::now();  // the program's start: the totals include loading the data
Index g_trained_tokens = 0;                      // real tokens the training steps of this run processed

/// CPU seconds (user + system) this process has used: with wall time, it shows how much the run was slowed by
/// other programs sharing the cores.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Options

struct Options {
  std::string task = "fashion-mnist";
  Index d_model = 64, layers = 2, d_qk = 32, d_ema = 8, mem_size = 32;
  Index steps = 1200, batch = 32, warmup = -1;
  double lr = 3e-3, weight_decay = 0.01, clip = 1.0, dropout = 0.0;
  std::string optimizer = "adamw", decay = "cosine", parallel = "auto";
  int threads = 2;
  std::uint64_t seed = 1;
  int patch = 2;            // images: p x p pixels per token
  Index max_len = 2000;     // token tasks: longest sequence kept
  Index seq_len = 256;      // kjv-lm: training window
  Index train_size = -1;    // listops: generated training examples
  Index test_limit = -1;    // test examples (characters for kjv-lm) evaluated; -1 = task default
  Index eval_every = 0;
  std::string out_dir = ".";
  std::string checkpoint = "default";
  std::string predictions;  // classification: write the test logits and labels as .npy
  Index checkpoint_every = 500;
  double time_limit = 0;    // seconds of training; 0 = none
  bool resume = false, figures = true, compare = true;
  bool quiet = false;
};

/// Per-task defaults for every flag the user did not give.
void apply_task_defaults(Options& o, const CLI::App& app) {
  auto set = [&](const char* flag, auto& field, auto value) {
    if (app.count(flag) == 0) field = value;
  };
  if (o.task == "listops") {
    set("--d-model", o.d_model, 64), set("--mem-size", o.mem_size, 64), set("--batch", o.batch, 16);
    set("--steps", o.steps, 400), set("--lr", o.lr, 2e-3), set("--train-size", o.train_size, 10000);
    set("--test-limit", o.test_limit, 1000);
  } else if (o.task == "spam") {
    set("--mem-size", o.mem_size, 64), set("--batch", o.batch, 16), set("--steps", o.steps, 300);
    set("--lr", o.lr, 2e-3), set("--max-len", o.max_len, 1024);
  } else if (o.task == "kjv-lm") {
    set("--mem-size", o.mem_size, 64), set("--batch", o.batch, 16), set("--steps", o.steps, 600);
    set("--test-limit", o.test_limit, 100000);
  }
  if (o.warmup < 0) o.warmup = std::max<Index>(1, o.steps / 20);
  if (o.checkpoint == "default") o.checkpoint = o.out_dir + "/sma-demo-" + o.task + ".safetensors";
}

train::TrainConfig train_config(const Options& o) {
  train::TrainConfig tc;
  tc.steps = o.steps;
  tc.lr = o.lr;
  tc.warmup = o.warmup;
  tc.decay = optim::parse_decay(o.decay);
  tc.clip_norm = o.clip;
  tc.threads = o.threads;
  tc.parallelism = train::parse_parallelism(o.parallel);
  tc.seed = o.seed;
  tc.optimizer.kind = train::parse_optimizer(o.optimizer);
  tc.optimizer.weight_decay = o.weight_decay;
  return tc;
}

// ---------------------------------------------------------------------------------------------------------------
// Images as sequences

// (train::to_patches: each 28x28 image as (28/p)^2 tokens of p*p pixels, patches and pixels in raster order.)

// ---------------------------------------------------------------------------------------------------------------
// Figures

void write_curves(const std::string& path, const train::History& h, const std::string& title, bool lm) {
  auto smooth = [](const std::vector<double>& v, std::size_t k) {
    std::vector<double> o(v.size());
    double acc = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
      acc += v[i];
      if (i >= k) acc -= v[i - k];
      o[i] = acc / double(std::min(i + 1, k));
    }
    return o;
  };
  std::vector<double> x(h.step.begin(), h.step.end()), ex(h.eval_step.begin(), h.eval_step.end());
  const std::size_t k = std::max<std::size_t>(5, h.step.size() / 40);
  std::vector<double> loss = h.loss, acc = h.accuracy, eloss = h.eval_loss, eacc = h.eval_accuracy;
  if (lm)  // bits per character
    for (auto* v : {&loss, &eloss})
      for (double& e : *v) e = data::bits_per_char(e);
  for (double& a : acc) a *= 100;
  for (double& a : eacc) a *= 100;
  std::vector<sma_demo::svg::Series> ls = {{"train (per step)", "#1f77b4", x, loss, 1.0, 0.25},
                                           {"train (mean of " + std::to_string(k) + ")", "#1f77b4", x, smooth(loss, k), 2.0}};
  std::vector<sma_demo::svg::Series> as = {{"train (per step)", "#2ca02c", x, acc, 1.0, 0.25},
                                           {"train (mean of " + std::to_string(k) + ")", "#2ca02c", x, smooth(acc, k), 2.0}};
  if (!ex.empty()) {
    ls.push_back({"held-out", "#d62728", ex, eloss, 2.0, 1.0, true});
    as.push_back({"held-out", "#d62728", ex, eacc, 2.0, 1.0, true});
  }
  std::string body = sma_demo::svg::text(470, 22, title, 15, "middle", "font-weight=\"bold\"");
  body += sma_demo::svg::line_chart(10, 34, 460, 300, lm ? "loss (bits per character)" : "loss (nats)", "step", ls);
  body += sma_demo::svg::line_chart(470, 34, 460, 300, lm ? "next-character accuracy (%)" : "accuracy (%)", "step", as);
  sma_demo::svg::write(path, sma_demo::svg::document(940, 345, body));
}

/// Rows: images; columns: the image, then one panel per layer with the routed patches highlighted.
void write_image_pattern(const std::string& path, const std::vector<std::vector<float>>& pixels, int patch,
                         const std::vector<std::vector<std::vector<std::uint8_t>>>& active,  // [image][layer][token]
                         const std::vector<std::string>& labels, const std::string& title) {
  const double s = 4, P = 28 * s, gap = 14, left = 200, top = 54;
  const std::size_t n_layers = active.empty() ? 0 : active[0].size();
  const double W = left + double(n_layers + 1) * (P + gap) + 10, H = top + double(pixels.size()) * (P + 22) + 30;
  std::string b = sma_demo::svg::text(W / 2, 22, title, 15, "middle", "font-weight=\"bold\"");
  b += sma_demo::svg::text(W / 2, 40, "orange: positions the layer's router sent to the attention unit; unmarked: seen by the EMA (SSM) only", 11, "middle");
  for (std::size_t c = 0; c <= n_layers; ++c)
    b += sma_demo::svg::text(left + double(c) * (P + gap) + P / 2, top - 2, c == 0 ? "input" : "layer " + std::to_string(c), 12, "middle");
  const int g = 28 / patch;
  for (std::size_t i = 0; i < pixels.size(); ++i) {
    const double y0 = top + 4 + double(i) * (P + 22);
    std::size_t sep = labels[i].find('|');
    b += sma_demo::svg::text(left - 10, y0 + P / 2 - 4, labels[i].substr(0, sep), 12, "end");
    if (sep != std::string::npos) b += sma_demo::svg::text(left - 10, y0 + P / 2 + 12, labels[i].substr(sep + 1), 11, "end", "fill=\"#555\"");
    // The image once, as a group on a black square (background pixels are not drawn), then placed in every panel.
    const std::string id = "img" + std::to_string(i);
    b += "<defs><g id=\"" + id + "\">" + sma_demo::svg::rect(0, 0, P, P, "#000000");
    for (int r = 0; r < 28; ++r)
      for (int q = 0; q < 28; ++q) {
        const std::string fill = sma_demo::svg::grey(pixels[i][static_cast<std::size_t>(r * 28 + q)]);
        if (fill != "#000000") b += sma_demo::svg::rect(q * s, r * s, s + 0.05, s + 0.05, fill);
      }
    b += "</g></defs>\n";
    for (std::size_t c = 0; c <= n_layers; ++c) {
      const double x0 = left + double(c) * (P + gap);
      b += "<use href=\"#" + id + "\" xlink:href=\"#" + id + "\" x=\"" + sma_demo::svg::num(x0) + "\" y=\"" +
           sma_demo::svg::num(y0) + "\"/>\n";
      if (c == 0) continue;
      const auto& on = active[i][c - 1];
      std::size_t routed = 0;
      for (int t = 0; t < g * g; ++t) {
        if (!on[static_cast<std::size_t>(t)]) continue;
        ++routed;
        b += sma_demo::svg::rect(x0 + (t % g) * patch * s, y0 + (t / g) * patch * s, patch * s, patch * s, "#ff7f0e",
                                 "fill-opacity=\"0.6\"");
      }
      b += sma_demo::svg::rect(x0, y0, P, P, "none", "stroke=\"#444\" stroke-width=\"0.8\"");
      b += sma_demo::svg::text(x0 + P / 2, y0 + P + 13, fmt("%.0f%% routed", 100.0 * double(routed) / double(g * g)), 10, "middle");
    }
  }
  sma_demo::svg::write(path, sma_demo::svg::document(W, H, b));
}

/// Token sequences: one strip per example and layer, routed tokens highlighted.
void write_token_pattern(const std::string& path, const std::vector<std::vector<std::string>>& tokens,
                         const std::vector<std::vector<std::vector<std::uint8_t>>>& active,
                         const std::vector<std::string>& labels, const std::string& title) {
  const std::size_t shown = 64;
  const double cw = 15, ch = 18, left = 70, top = 50;
  const std::size_t n_layers = active.empty() ? 0 : active[0].size();
  const double W = left + double(shown) * cw + 20, H = top + double(tokens.size()) * (double(n_layers) * (ch + 2) + 34) + 10;
  std::string b = sma_demo::svg::text(W / 2, 22, title, 15, "middle", "font-weight=\"bold\"");
  b += sma_demo::svg::text(W / 2, 40, "first " + std::to_string(shown) + " positions of each example; orange: routed to the attention unit", 11, "middle");
  double y = top;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    b += sma_demo::svg::text(left, y + 12, labels[i], 12, "start", "font-weight=\"bold\"");
    y += 18;
    for (std::size_t l = 0; l < n_layers; ++l) {
      b += sma_demo::svg::text(left - 6, y + 13, "layer " + std::to_string(l + 1), 10, "end");
      for (std::size_t t = 0; t < shown && t < tokens[i].size(); ++t) {
        const bool on = active[i][l][t] != 0;
        b += sma_demo::svg::rect(left + double(t) * cw, y, cw - 1, ch, on ? "#ffb066" : "#eeeeee");
        b += sma_demo::svg::text(left + double(t) * cw + cw / 2 - 0.5, y + 13, tokens[i][t], 10, "middle",
                                 "font-family=\"monospace\"");
      }
      y += ch + 2;
    }
    y += 14;
  }
  sma_demo::svg::write(path, sma_demo::svg::document(W, H, b));
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse vs dense

struct Measure {
  std::vector<double> density;
  double forward_ms = 0, train_ms = 0;  // medians
  double forward_mb = 0, train_mb = 0;  // peak heap growth during one pass
  Index tokens = 0;
};

/// Times inference (eval forward) and a training pass (forward + backward) of a copy of `model` on `batch`, with
/// the model's routing as learned, or with every token activated (router_shift large on every layer).
template <class Task, class Model, class SetShift>
Measure measure(const Model& trained, const typename Task::Batch& batch, int threads, train::Parallelism par,
                bool dense, SetShift&& set_shift, int reps = 3) {
  Model model = trained;
  if (dense) set_shift(model, 1e4);
  ParamBuffer<T> buf(model);
  Measure m;
  auto timed = [&](Mode mode, bool backward, double& ms, double& mb) {
    train::DataParallel<Task> dp(model, buf, threads, par);  // fresh: its caches start empty
    const std::size_t base = sma_demo::heap_in_use();
    sma_demo::reset_heap_peak();
    std::vector<double> times;
    for (int r = -1; r < reps; ++r) {  // r = -1: an untimed warm-up (threads, first-touch pages, replicas)
      buf.zero_grad();
      const auto t0 = Clock::now();
      const train::ShardResult res = dp.run(batch, mode, 7, backward);
      if (r >= 0) times.push_back(1e3 * seconds_since(t0));
      if (r == -1) {
        mb = double(sma_demo::heap_peak() - std::min(base, sma_demo::heap_peak())) / 1048576.0;
        m.density = res.activity.densities();
        m.tokens = res.tokens;
      }
    }
    std::sort(times.begin(), times.end());
    ms = times[times.size() / 2];
  };
  timed(Mode::eval, false, m.forward_ms, m.forward_mb);
  timed(Mode::train, true, m.train_ms, m.train_mb);
  return m;
}

void print_compare(const Measure& sparse, const Measure& dense, Index batch, const std::string& what) {
  std::printf("\nSparse vs dense: the trained model on %lld test %s (%lld tokens), median of 3 runs:\n\n",
              static_cast<long long>(batch), what.c_str(), static_cast<long long>(sparse.tokens));
  std::printf("| routing | density per layer | inference ms | training pass ms | inference peak MB | training peak MB |\n");
  std::printf("|---|---|---:|---:|---:|---:|\n");
  auto row = [&](const char* name, const Measure& m) {
    std::printf("| %s | %s | %.1f | %.1f | %.1f | %.1f |\n", name, train::format_density(m.density).c_str(),
                m.forward_ms, m.train_ms, m.forward_mb, m.train_mb);
  };
  row("learned (sparse)", sparse);
  row("every token activated", dense);
  std::printf("\nsparse / dense: inference time x%.2f, training time x%.2f, training memory x%.2f.\n",
              sparse.forward_ms / dense.forward_ms, sparse.train_ms / dense.train_ms,
              dense.train_mb > 0 ? sparse.train_mb / dense.train_mb : 0.0);
  std::printf("(Training pass = forward + backward, no optimiser step. Peak MB = the largest growth of live heap "
              "memory during one pass,%s counted at every malloc/free; the model's own parameters are not included.)\n",
              sma_demo::alloc_counter_active() ? "" : " NOT AVAILABLE on this platform (0),");
}

// ---------------------------------------------------------------------------------------------------------------
// Training, shared by the tasks

template <class Trainer>
std::map<std::string, std::string> run_metadata(const Options& o, const nlohmann::json& model_config, Trainer& tr) {
  return {{"task", o.task}, {"model_config", model_config.dump()}, {"patch", std::to_string(o.patch)},
          {"data_position", nlohmann::json{{"step", tr.step()}, {"seed", std::to_string(o.seed)}}.dump()}};
}

/// Resumes from the checkpoint when asked, after checking that it holds the same model.
template <class Trainer>
void maybe_resume(const Options& o, Trainer& tr, const nlohmann::json& model_config) {
  if (!o.resume) return;
  if (o.checkpoint.empty()) throw ValueError("--resume needs a checkpoint (--checkpoint PATH)");
  const io::SafetensorsFile f(o.checkpoint);
  if (f.has_metadata("model_config") && nlohmann::json::parse(f.metadata_value("model_config")) != model_config)
    throw ValueError(str_cat(o.checkpoint, " holds a different model: ", f.metadata_value("model_config"),
                             "\n  this run builds: ", model_config.dump(), "\n  (use the same --task and model flags)"));
  const auto info = tr.resume(o.checkpoint);
  std::printf("resumed from %s at step %lld\n", o.checkpoint.c_str(), static_cast<long long>(info.step));
  if (info.step >= o.steps) std::printf("(the checkpoint is already at --steps %lld: nothing to train)\n", static_cast<long long>(o.steps));
}

template <class Trainer>
void train_with_progress(const Options& o, Trainer& tr, std::function<typename Trainer::Batch(Index)> batch,
                         std::function<train::ShardResult()> evaluate, const nlohmann::json& model_config) {
  train::FitOptions<typename Trainer::Batch> fit;
  fit.batch = std::move(batch);
  fit.eval_every = o.eval_every;
  fit.evaluate = std::move(evaluate);
  fit.checkpoint_path = o.checkpoint;
  fit.checkpoint_every = o.checkpoint_every;
  fit.checkpoint_metadata = [&]() { return run_metadata(o, model_config, tr); };
  fit.progress = !o.quiet;
  fit.on_step = [](const train::StepStats& st) { g_trained_tokens += st.tokens; };
  fit.time_limit = o.time_limit;
  tr.fit(fit);
  if (tr.step() < o.steps)
    std::printf("\nstopped at step %lld of %lld: --time-limit %g s reached (the learning rate had not finished its "
                "decay; the checkpoint resumes with --resume)\n",
                static_cast<long long>(tr.step()), static_cast<long long>(o.steps), o.time_limit);
}

void print_throughput(double train_s) {
  if (g_trained_tokens > 0)
    std::printf("\ntraining: %s tokens in %.1f s, %s tokens/s\n", train::format_count(double(g_trained_tokens)).c_str(),
                train_s, train::format_count(double(g_trained_tokens) / train_s).c_str());
}

void print_header(const Options& o, const std::string& what, Index params, const std::string& par, int shards) {
  std::printf("sma-demo: %s\n", what.c_str());
  std::printf("model: %lld parameters; %lld steps of %lld, %s lr %g (warm-up %lld, %s decay), clip %g; "
              "%d threads (%s%s); seed %llu\n",
              static_cast<long long>(params), static_cast<long long>(o.steps), static_cast<long long>(o.batch),
              o.optimizer.c_str(), o.lr, static_cast<long long>(o.warmup), o.decay.c_str(), o.clip, o.threads,
              par.c_str(), shards > 1 ? str_cat(": ", shards, " batch shards").c_str() : "",
              static_cast<unsigned long long>(o.seed));
}

// ---------------------------------------------------------------------------------------------------------------
// Classification tasks

struct ClassData {
  data::Dataset train, test;
  Index length = 0;
  std::string what;          // e.g. "images"
  std::string description;   // one line for the header
  bool images = false;
  float mean = 0, std = 1;   // images: the normalisation, to draw them
};

ClassData load_class_data(const Options& o) {
  ClassData d;
  if (o.task == "fashion-mnist" || o.task == "mnist") {
    const bool fashion = o.task == "fashion-mnist";
    data::ImageOptions io;
    io.normalize = true;
    auto load = [&](data::Split s) { return fashion ? data::load_fashion_mnist(s, io) : data::load_mnist(s, io); };
    d.train = train::to_patches(load(data::Split::train), o.patch);
    d.test = train::to_patches(load(data::Split::test), o.patch);
    d.length = 784 / (o.patch * o.patch);
    d.images = true;
    d.mean = fashion ? 0.2860f : 0.1307f;
    d.std = fashion ? 0.3530f : 0.3081f;
    d.what = "images";
    d.description = str_cat("sequential ", fashion ? "Fashion-MNIST" : "MNIST", ", each image a sequence of ", d.length,
                            o.patch > 1 ? str_cat(" tokens of ", o.patch, "x", o.patch, " pixels (--patch ", o.patch,
                                                  "; --patch 1 reads all 784 pixels one by one)")
                                        : std::string(" pixels"));
  } else if (o.task == "listops") {
    const Index n_test = o.test_limit > 0 ? o.test_limit : 1000;
    data::Splits s = data::generate_listops_splits(o.train_size, 0, n_test, data::ListOpsConfig{}, o.seed);
    d.train = std::move(s.train);
    d.test = std::move(s.test);
    d.length = o.max_len;
    d.what = "expressions";
    d.description = str_cat("ListOps (LRA's generator: 500 < length < 2000 tokens), ", d.train.size(),
                            " generated training expressions");
  } else {  // spam
    data::SpamAssassinOptions so;
    so.max_bytes = o.max_len;
    data::Splits s = data::split(data::load_spam_assassin(so), 0.1, 0.1, o.seed);
    d.train = std::move(s.train);
    d.test = std::move(s.test);
    d.length = o.max_len;
    d.what = "e-mails";
    d.description = str_cat("SpamAssassin ham/spam from the first ", o.max_len, " bytes of each e-mail (",
                            d.train.size(), " train, ", d.test.size(), " test)");
  }
  return d;
}

SeqBoatModelConfig classifier_config(const Options& o, Index d_input, Index classes, Index length) {
  SeqBoatModelConfig mc;
  mc.d_input = d_input;
  mc.d_output = classes;
  mc.d_model = o.d_model;
  mc.n_layers = o.layers;
  mc.dropout = o.dropout;
  mc.prenorm = true;
  mc.norm_type = NormType::layernorm;  // no batch statistics: data-parallel shards compute the same function
  mc.d_qk = o.d_qk;
  mc.d_ema = o.d_ema;
  mc.mem_size = o.mem_size;
  mc.bidirectional = true;
  mc.max_positions = length;
  mc.routing = RoutingSemantics::per_row;  // a row's routing never depends on the rest of its batch
  return mc;
}

void set_classifier_shift(SeqBoatModel<T>& m, double s) {
  for (auto& l : m.layers()) l.config().router_shift = s;
}
void set_classifier_shift(train::TokenClassifier<T>& m, double s) { set_classifier_shift(m.model(), s); }

template <class Model>
int run_classification(const Options& o, ClassData& d, Model& model, const nlohmann::json& model_config) {
  using Task = train::ClassificationTask<Model>;
  const auto t_start = g_start;
  const data::PadTo pad_to = d.images ? data::PadTo::max_len : data::PadTo::longest;
  train::Trainer<Task> tr(model, train_config(o));
  print_header(o, d.description, count_params(model), train::to_string(tr.parallel().effective()), tr.parallel().shards());
  std::printf("data: %lld training and %lld test %s\n", static_cast<long long>(d.train.size()),
              static_cast<long long>(d.test.size()), d.what.c_str());
  maybe_resume(o, tr, model_config);
  std::fflush(stdout);

  train::EpochBatches<T> batches(d.train, o.batch, o.seed, d.length, pad_to);
  const Index n_test = d.images && o.test_limit > 0 ? std::min(o.test_limit, d.test.size()) : d.test.size();
  auto evaluate = [&]() {
    train::SequentialBatches<T> eb(d.test, d.images ? 100 : 16, d.length, pad_to, n_test);
    return tr.evaluate(eb);
  };
  const auto t_train = Clock::now();
  train_with_progress<train::Trainer<Task>>(o, tr, [&](Index s) { return batches(s); }, evaluate, model_config);
  const double train_s = seconds_since(t_train);
  print_throughput(train_s);

  const auto t_eval = Clock::now();
  const train::ShardResult test = evaluate();
  const double eval_s = seconds_since(t_eval);
  const std::vector<double> dens = test.activity.densities();
  std::printf("test accuracy: %.2f%% on %lld %s (loss %.4f; evaluated in %.1f s)\n", 100 * test.accuracy(),
              static_cast<long long>(test.counted), d.what.c_str(), test.loss(), eval_s);
  const auto counts = data::class_counts(d.test);
  std::printf("(majority class: %.1f%%)\n",
              100.0 * double(*std::max_element(counts.begin(), counts.end())) / double(d.test.size()));
  std::printf("learned activation density (tokens routed to attention / all tokens, on the test set):\n");
  for (std::size_t i = 0; i < dens.size(); ++i) std::printf("  layer %zu: %.3f\n", i + 1, dens[i]);

  if (o.compare) {
    const Index nb = std::min<Index>(d.images ? 64 : 16, d.test.size());  // token tasks: sequences up to 2000 long
    std::vector<Index> rows(static_cast<std::size_t>(nb));
    for (Index i = 0; i < nb; ++i) rows[static_cast<std::size_t>(i)] = i;
    const data::Batch<T> batch = data::make_batch<T>(d.test, rows, d.length, pad_to);
    auto shift = [](Model& m, double s) { set_classifier_shift(m, s); };
    const auto par = tr.parallel().effective();
    const Measure sparse = measure<Task>(model, batch, o.threads, par, false, shift);
    const Measure dense = measure<Task>(model, batch, o.threads, par, true, shift);
    print_compare(sparse, dense, nb, d.what);
  }

  if (!o.predictions.empty()) {  // the test set's logits (N, classes) float32 and labels (N) int64, as .npy
    train::SequentialBatches<T> eb(d.test, d.images ? 100 : 16, d.length, pad_to, n_test);
    std::vector<float> logits;
    std::vector<std::int64_t> labels;
    data::Batch<T> b;
    Index classes = 0;
    while (eb(b)) {
      Context ctx(Mode::eval);
      typename Model::Cache cache;
      const Tensor2<T> y = Task::forward(model, ctx, b, cache);
      classes = y.dimension(1);
      logits.insert(logits.end(), y.data(), y.data() + y.size());
      labels.insert(labels.end(), b.labels.begin(), b.labels.end());
    }
    const Index n = static_cast<Index>(labels.size());
    std::string stem = o.predictions;
    if (stem.size() > 4 && stem.compare(stem.size() - 4, 4, ".npy") == 0) stem.resize(stem.size() - 4);
    io::save_npy(stem + ".npy", logits.data(), {n, classes}, io::DType::F32);
    io::save_npy(stem + "-labels.npy", labels.data(), {n}, io::DType::I64);
    std::printf("\nwrote %s.npy (test logits, %lld x %lld float32) and %s-labels.npy\n", stem.c_str(),
                static_cast<long long>(n), static_cast<long long>(classes), stem.c_str());
  }

  if (o.figures) {
    const std::string curves = o.out_dir + "/sma-demo-" + o.task + "-curves.svg";
    const std::string pattern = o.out_dir + "/sma-demo-" + o.task + "-activations.svg";
    write_curves(curves, tr.history(), str_cat("SeqBoat on ", o.task, ": training curves"), false);
    // A few test examples of different classes, routed by the trained model.
    std::vector<Index> pick;
    const Index classes = d.test.num_classes;
    const Index per_class = classes <= 3 ? 2 : 1;  // two-class tasks: two examples of each class
    for (Index want = 0; want < 6 && want < classes; ++want) {
      const Index c = classes <= 6 ? want : want * classes / 6;
      Index found = 0;
      for (Index i = 0; i < d.test.size() && found < per_class; ++i)
        if (d.test.examples[static_cast<std::size_t>(i)].label == c) pick.push_back(i), ++found;
    }
    const data::Batch<T> b = data::make_batch<T>(d.test, pick, d.length, pad_to);
    Context ctx(Mode::eval);
    typename Model::Cache cache;
    const Tensor2<T> logits = Task::forward(model, ctx, b, cache);
    const auto& layer_caches = [&]() -> const auto& {
      if constexpr (std::is_same_v<Model, SeqBoatModel<T>>) return cache.layers;
      else return cache.model.layers;
    }();
    std::vector<std::vector<std::vector<std::uint8_t>>> active(pick.size());
    std::vector<std::string> labels;
    for (std::size_t i = 0; i < pick.size(); ++i) {
      const Index L = b.lengths[i];
      for (const auto& lc : layer_caches) {
        std::vector<std::uint8_t> on(static_cast<std::size_t>(L));
        for (Index t = 0; t < L; ++t) on[static_cast<std::size_t>(t)] = lc.router.active(static_cast<Index>(i), t);
        active[i].push_back(std::move(on));
      }
      Index pred = 0;
      for (Index c = 1; c < logits.dimension(1); ++c)
        if (logits(static_cast<Index>(i), c) > logits(static_cast<Index>(i), pred)) pred = c;
      const auto& names = d.test.class_names;
      const std::string truth = names.empty() ? std::to_string(b.labels[i]) : names[static_cast<std::size_t>(b.labels[i])];
      const std::string guess = names.empty() ? std::to_string(pred) : names[static_cast<std::size_t>(pred)];
      labels.push_back(truth + "|predicted: " + guess);
    }
    const std::string title = str_cat("What each SeqBoat layer sent to attention (", o.task, ", test set)");
    if (d.images) {
      std::vector<std::vector<float>> pixels;
      const int p = o.patch;
      for (Index i : pick) {
        std::vector<float> img = train::from_patches(d.test.examples[static_cast<std::size_t>(i)].values, p);
        for (float& x : img) x = x * d.std + d.mean;  // back to [0, 1] for drawing
        pixels.push_back(std::move(img));
      }
      write_image_pattern(pattern, pixels, p, active, labels, title);
    } else {
      std::vector<std::vector<std::string>> toks;
      for (Index i : pick) {
        std::vector<std::string> row;
        for (std::int32_t id : d.test.examples[static_cast<std::size_t>(i)].tokens) {
          if (o.task == "listops") {
            const std::string s = data::listops::token_text(id);
            row.push_back(s == "[MIN" ? "m" : s == "[MAX" ? "M" : s == "[MED" ? "D" : s == "[SM" ? "S" : s);
          } else {
            const char ch = static_cast<char>(id);
            // a space as a middle dot, a line break as a return arrow, other control or non-ASCII bytes as a box
            row.push_back(id == ' ' ? std::string("\xC2\xB7") : id == '\n' ? std::string("\xE2\x86\xB5")
                          : id < 32 || id > 126 ? std::string("\xE2\x96\xA1") : std::string(1, ch));
          }
        }
        toks.push_back(std::move(row));
      }
      for (auto& l : labels) l = "label " + l.replace(l.find('|'), 1, ", ");
      write_token_pattern(pattern, toks, active, labels,
                          title + (o.task == "listops" ? " (M max, m min, D median, S sum mod 10)" : ""));
    }
    std::printf("\nwrote %s and %s\n", curves.c_str(), pattern.c_str());
  }
  if (!o.checkpoint.empty()) std::printf("checkpoint: %s (resume with --resume)\n", o.checkpoint.c_str());
  std::printf("time: %.1f s in all (training %.1f s); %.1f CPU seconds\n", seconds_since(t_start), train_s,
              cpu_seconds());
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Character language model

#ifdef SMA_DEMO_HAS_LM
int run_lm(const Options& o) {
  const auto t_start = g_start;
  const data::CharCorpus kjv = data::load_kjv_corpus();
  SeqBoatLmConfig lc;
  lc.vocab_size = kjv.vocab.size();
  lc.embed_dim = o.d_model;
  lc.hidden_dim = 2 * o.d_model;
  lc.zdim = o.d_qk;
  lc.ndim = o.d_ema;
  lc.ffn_hidden_dim = 2 * o.d_model;
  lc.layers = o.layers;
  lc.window_size = o.mem_size;
  lc.max_positions = o.seq_len;
  lc.dropout = o.dropout;
  SeqBoatLm<T> model(lc, o.seed);
  const nlohmann::json model_config = lc.to_json();
  using Task = train::LanguageModelTask<SeqBoatLm<T>>;
  train::Trainer<Task> tr(model, train_config(o));
  print_header(o, str_cat("causal character LM on the King James Bible (", kjv.train.size(), " training characters, ",
                          kjv.vocab.size(), " symbols), windows of ", o.seq_len),
               count_params(model), train::to_string(tr.parallel().effective()), tr.parallel().shards());
  maybe_resume(o, tr, model_config);
  std::fflush(stdout);

  train::StreamBatches batches(kjv.train, o.batch, o.seq_len, o.seed);
  const Index n_test = std::min<Index>(o.test_limit > 0 ? o.test_limit : 100000, static_cast<Index>(kjv.test.size()));
  const std::vector<std::int32_t> test(kjv.test.begin(), kjv.test.begin() + n_test);
  auto evaluate = [&]() {
    data::LmSequentialBatcher eb(test, 16, o.seq_len);
    return tr.evaluate([&](data::LmBatch& b) { return eb.next(b); });
  };
  const auto t_train = Clock::now();
  train_with_progress<train::Trainer<Task>>(o, tr, [&](Index s) { return batches(s); }, evaluate, model_config);
  const double train_s = seconds_since(t_train);
  print_throughput(train_s);
  const train::ShardResult r = evaluate();
  std::printf("test: %.3f bits per character, next-character accuracy %.2f%% (%lld characters)\n",
              data::bits_per_char(r.loss()), 100 * r.accuracy(), static_cast<long long>(r.counted));
  const auto dens = r.activity.densities();
  std::printf("learned activation density (tokens routed to attention / all tokens, on the test text):\n");
  for (std::size_t i = 0; i < dens.size(); ++i) std::printf("  layer %zu: %.3f\n", i + 1, dens[i]);

  if (o.compare) {
    data::LmSequentialBatcher eb(test, 16, o.seq_len);
    data::LmBatch b;
    eb.next(b);
    auto shift = [](SeqBoatLm<T>& m, double s) {
      for (Index i = 0; i < m.num_layers(); ++i) m.layer(i).config().router_shift = s;
    };
    const auto par = tr.parallel().effective();
    const Measure sparse = measure<Task>(model, b, o.threads, par, false, shift);
    const Measure dense = measure<Task>(model, b, o.threads, par, true, shift);
    print_compare(sparse, dense, b.size(), str_cat("windows of ", o.seq_len, " characters"));
  }
  if (o.figures) {
    const std::string curves = o.out_dir + "/sma-demo-" + o.task + "-curves.svg";
    const std::string pattern = o.out_dir + "/sma-demo-" + o.task + "-activations.svg";
    write_curves(curves, tr.history(), "SeqBoat character LM on the King James Bible: training curves", true);
    data::LmSequentialBatcher eb(test, 4, 64);
    data::LmBatch b;
    eb.next(b);
    Context ctx(Mode::eval);
    typename SeqBoatLm<T>::Cache cache;
    model.forward(ctx, b.inputs, cache);
    std::vector<std::vector<std::string>> toks;
    std::vector<std::vector<std::vector<std::uint8_t>>> active;
    std::vector<std::string> labels;
    for (Index r = 0; r < b.size(); ++r) {
      std::vector<std::string> row;
      for (Index t = 0; t < b.length(); ++t) {
        const char ch = kjv.vocab.symbol(b.inputs(r, t));
        row.push_back(ch == ' ' ? "\xC2\xB7" : ch == '\n' ? "\xE2\x86\xB5" : std::string(1, ch));
      }
      toks.push_back(std::move(row));
      active.emplace_back();
      for (const auto& lc2 : cache.layers) {
        std::vector<std::uint8_t> on(static_cast<std::size_t>(b.length()));
        for (Index t = 0; t < b.length(); ++t) on[static_cast<std::size_t>(t)] = lc2.router.active(r, t);
        active.back().push_back(std::move(on));
      }
      labels.push_back(str_cat("test window ", r + 1));
    }
    write_token_pattern(pattern, toks, active, labels, "What each SeqBoat layer sent to attention (KJV test text)");
    std::printf("\nwrote %s and %s\n", curves.c_str(), pattern.c_str());
  }
  if (!o.checkpoint.empty()) std::printf("checkpoint: %s (resume with --resume)\n", o.checkpoint.c_str());
  std::printf("time: %.1f s in all (training %.1f s); %.1f CPU seconds\n", seconds_since(t_start), train_s,
              cpu_seconds());
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"sma-demo: train a small SeqBoat model on data that needs no download, and show what it learned"};
  app.add_option("--task", o.task, "fashion-mnist, mnist, listops, spam or kjv-lm")
      ->check(CLI::IsMember({"fashion-mnist", "mnist", "listops", "spam", "kjv-lm"}))
      ->capture_default_str();
  app.add_option("--d-model", o.d_model, "model width D")->capture_default_str();
  app.add_option("--layers", o.layers, "SeqBoat layers")->capture_default_str();
  app.add_option("--d-qk", o.d_qk, "query/key width of the attention unit")->capture_default_str();
  app.add_option("--d-ema", o.d_ema, "EMA order (state size per channel)")->capture_default_str();
  app.add_option("--mem-size", o.mem_size, "attention window W over the routed tokens (image default 32, else 64)")->capture_default_str();
  app.add_option("--steps", o.steps, "optimiser steps (fashion-mnist/mnist default 1200)")->capture_default_str();
  app.add_option("--batch", o.batch, "batch size")->capture_default_str();
  app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
  app.add_option("--warmup", o.warmup, "warm-up steps (default: 5% of the steps)");
  app.add_option("--decay", o.decay, "learning-rate decay after warm-up: cosine, linear or constant")->capture_default_str();
  app.add_option("--optimizer", o.optimizer, "adamw, radam or sgd")->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "weight decay (decoupled for Adam variants)")->capture_default_str();
  app.add_option("--clip", o.clip, "gradient clipping by global norm (0 = off)")->capture_default_str();
  app.add_option("--dropout", o.dropout, "dropout at the reference's places")->capture_default_str();
  app.add_option("--threads", o.threads, "OpenMP threads")->capture_default_str();
  app.add_option("--parallel", o.parallel, "auto, shards (split each batch across threads) or layers")->capture_default_str();
  app.add_option("--seed", o.seed, "seed of everything random (initialisation, data order, dropout)")->capture_default_str();
  app.add_option("--patch", o.patch, "images: p x p pixels per token (1 = all 784 pixels one by one)")->capture_default_str();
  app.add_option("--max-len", o.max_len, "token tasks: longest sequence kept (listops 2000, spam 1024 bytes)");
  app.add_option("--seq-len", o.seq_len, "kjv-lm: characters per training window")->capture_default_str();
  app.add_option("--train-size", o.train_size, "listops: generated training expressions (default 10000)");
  app.add_option("--test-limit", o.test_limit, "evaluate on the first N test examples (kjv-lm: characters)");
  app.add_option("--eval-every", o.eval_every, "evaluate on the test set every N steps (0 = only at the end)")->capture_default_str();
  app.add_option("--out-dir", o.out_dir, "folder for the pictures and the default checkpoint")->capture_default_str();
  app.add_option("--checkpoint", o.checkpoint, "checkpoint file (default <out-dir>/sma-demo-<task>.safetensors; \"\" = none)");
  app.add_option("--checkpoint-every", o.checkpoint_every, "steps between checkpoints (and one at the end)")->capture_default_str();
  app.add_option("--time-limit", o.time_limit, "stop training after this many seconds (0 = no limit)")->capture_default_str();
  app.add_option("--predictions", o.predictions,
                 "classification: write the test logits to FILE.npy and the labels to FILE-labels.npy");
  app.add_flag("--resume", o.resume, "continue from the checkpoint up to --steps");
  app.add_flag("!--no-figures", o.figures, "do not write the SVG pictures");
  app.add_flag("!--no-compare", o.compare, "skip the sparse-vs-dense table");
  app.add_flag("--quiet", o.quiet, "no progress bar");
  CLI11_PARSE(app, argc, argv);

  try {
    apply_task_defaults(o, app);
    if (o.task == "kjv-lm") {
#ifdef SMA_DEMO_HAS_LM
      return run_lm(o);
#else
      std::fprintf(stderr, "sma-demo: the kjv-lm task needs sma/models/lm.hpp, which this build lacks\n");
      return 2;
#endif
    }
    ClassData d = load_class_data(o);
    if (o.task == "fashion-mnist" || o.task == "mnist") {
      const SeqBoatModelConfig mc = classifier_config(o, o.patch * o.patch, 10, d.length);
      SeqBoatModel<T> model(mc, o.seed);
      return run_classification(o, d, model, train::to_json(mc));
    }
    train::TokenClassifierConfig tc;
    tc.vocab_size = d.train.vocab_size;
    tc.padding_idx = d.train.pad_token;
    tc.model = classifier_config(o, o.d_model, d.train.num_classes, d.length);
    train::TokenClassifier<T> model(tc, o.seed);
    return run_classification(o, d, model, tc.to_json());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nsma-demo: %s\n", e.what());
    return 1;
  }
}
