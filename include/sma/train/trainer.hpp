// sma/train/trainer.hpp: the training loop. batch -> forward/backward (data-parallel) -> clip -> optimiser step at
// the scheduled learning rate; metrics per step (loss, accuracy, tokens/s, activation density per layer), evaluation,
// checkpoints that resume exactly, and a progress bar.
//
//   SeqBoatModel<float> model(cfg, seed);
//   train::TrainConfig tc;  tc.steps = 600;  tc.lr = 3e-3;  tc.warmup = 30;
//   train::Trainer<train::ClassificationTask<SeqBoatModel<float>>> trainer(model, tc);
//   train::EpochBatches<float> batches(train_set, 32, tc.seed, 784);
//   train::FitOptions<decltype(trainer)::Batch> fit;
//   fit.batch = [&](Index step) { return batches(step); };
//   trainer.fit(fit);
//
// REPRODUCIBILITY Step k draws its dropout masks from mix_seed(seed, k) (and the batch, through EpochBatches or
//   StreamBatches, is a function of (seed, k) too), so the run is a function of (seed, threads) alone, and a run
//   resumed from a checkpoint at step k repeats the uninterrupted run's steps k, k+1, ... bit for bit.
#pragma once

#include <sma/core/param.hpp>
#include <sma/optim/optimizer.hpp>
#include <sma/train/checkpoint.hpp>
#include <sma/train/data_parallel.hpp>
#include <sma/train/optimizer.hpp>
#include <sma/train/progress.hpp>
#include <sma/train/task.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace sma::train {

struct TrainConfig {
  Index steps = 1000;                   ///< optimiser steps in the whole run
  OptimizerConfig optimizer;
  double lr = 1e-3;                     ///< peak learning rate
  Index warmup = 0;                     ///< linear warm-up steps
  optim::Decay decay = optim::Decay::cosine;
  double final_lr_ratio = 0.0;          ///< the decay ends at lr * final_lr_ratio
  double clip_norm = 1.0;               ///< global gradient-norm clipping (<= 0: off)
  int threads = 0;                      ///< 0: OpenMP's default
  Parallelism parallelism = Parallelism::automatic;
  std::uint64_t seed = 0;

  optim::Schedule schedule() const {
    optim::Schedule s;
    s.peak = lr;
    s.warmup = warmup;
    s.total = steps;
    s.decay = decay;
    s.final_ratio = final_lr_ratio;
    return s;
  }
  nlohmann::json to_json() const {
    const char* d = decay == optim::Decay::constant ? "constant" : decay == optim::Decay::linear ? "linear" : "cosine";
    return {{"steps", steps},         {"optimizer", optimizer.to_json()},  {"lr", lr},
            {"warmup", warmup},       {"decay", d},                        {"final_lr_ratio", final_lr_ratio},
            {"clip_norm", clip_norm}, {"threads", threads},                {"parallelism", to_string(parallelism)},
            {"seed", std::to_string(seed)}};
  }
};

/// What one optimiser step did.
struct StepStats {
  Index step = 0;            ///< 1-based: the number of steps done after this one
  double loss = 0, accuracy = 0;
  double lr = 0, grad_norm = 0;
  double seconds = 0;        ///< wall time of the step
  Index tokens = 0;          ///< real input positions processed
  std::vector<double> density;
  double tokens_per_second() const { return seconds > 0 ? double(tokens) / seconds : 0.0; }
};

/// Per-step and per-evaluation records, for curves and for resuming (saved in checkpoints as JSON).
struct History {
  std::vector<Index> step;
  std::vector<double> loss, accuracy, lr, grad_norm, tokens_per_second;
  std::vector<std::vector<double>> density;
  std::vector<Index> eval_step;
  std::vector<double> eval_loss, eval_accuracy;

  void record(const StepStats& s) {
    step.push_back(s.step);
    loss.push_back(s.loss);
    accuracy.push_back(s.accuracy);
    lr.push_back(s.lr);
    grad_norm.push_back(s.grad_norm);
    tokens_per_second.push_back(s.tokens_per_second());
    density.push_back(s.density);
  }
  void record_eval(Index at, double l, double acc) {
    eval_step.push_back(at);
    eval_loss.push_back(l);
    eval_accuracy.push_back(acc);
  }
  /// Drops records after step `last` (a resumed run continues from there).
  void truncate(Index last) {
    std::size_t n = 0;
    while (n < step.size() && step[n] <= last) ++n;
    step.resize(n), loss.resize(n), accuracy.resize(n), lr.resize(n), grad_norm.resize(n);
    tokens_per_second.resize(n), density.resize(n);
    std::size_t e = 0;
    while (e < eval_step.size() && eval_step[e] <= last) ++e;
    eval_step.resize(e), eval_loss.resize(e), eval_accuracy.resize(e);
  }
  nlohmann::json to_json() const {
    return {{"step", step},           {"loss", loss},           {"accuracy", accuracy},
            {"lr", lr},               {"grad_norm", grad_norm}, {"tokens_per_second", tokens_per_second},
            {"density", density},     {"eval_step", eval_step}, {"eval_loss", eval_loss},
            {"eval_accuracy", eval_accuracy}};
  }
  static History from_json(const nlohmann::json& j) {
    History h;
    j.at("step").get_to(h.step);
    j.at("loss").get_to(h.loss);
    j.at("accuracy").get_to(h.accuracy);
    j.at("lr").get_to(h.lr);
    j.at("grad_norm").get_to(h.grad_norm);
    j.at("tokens_per_second").get_to(h.tokens_per_second);
    j.at("density").get_to(h.density);
    j.at("eval_step").get_to(h.eval_step);
    j.at("eval_loss").get_to(h.eval_loss);
    j.at("eval_accuracy").get_to(h.eval_accuracy);
    return h;
  }
};

/// What Trainer::fit needs besides the model; only `batch` is required.
template <class Batch>
struct FitOptions {
  std::function<Batch(Index step)> batch;            ///< the training batch of step k (0-based)
  Index eval_every = 0;                              ///< steps between evaluations (0: none during training)
  std::function<ShardResult()> evaluate;             ///< returns held-out metrics (e.g. Trainer::evaluate(...))
  std::string checkpoint_path;                       ///< "" = no checkpoints
  Index checkpoint_every = 0;                        ///< steps between checkpoints (0: only at the end)
  std::function<std::map<std::string, std::string>()> checkpoint_metadata;  ///< extra metadata per save
  bool progress = true;                              ///< draw the progress bar
  std::FILE* progress_out = stderr;
  double progress_interval = 10.0;                   ///< seconds between lines when not on a terminal
  Index stop_after = -1;                             ///< stop (as if interrupted) once this many steps are done
  double time_limit = 0;                             ///< seconds of training after which fit stops (as if
                                                     ///< interrupted, with a checkpoint); <= 0: no limit
  std::function<void(const StepStats&)> on_step;     ///< called after each step
};

/// "0.41/0.23" for the per-layer densities.
inline std::string format_density(const std::vector<double>& d) {
  std::string s;
  char buf[16];
  for (std::size_t i = 0; i < d.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.2f", i ? "/" : "", d[i]);
    s += buf;
  }
  return s.empty() ? "-" : s;
}

template <class TaskT>
class Trainer {
 public:
  using Task = TaskT;
  using Model = typename Task::Model;
  using T = typename Task::Scalar;
  using Batch = typename Task::Batch;

  /// Binds the model's parameters into one buffer (the model must stay where it is while the trainer lives; when
  /// the trainer goes, the model gets its own storage back).
  Trainer(Model& model, const TrainConfig& cfg)
      : cfg_(cfg), model_(&model), buffer_(model), optimizer_(buffer_, cfg.optimizer),
        parallel_(model, buffer_, cfg.threads, cfg.parallelism), schedule_(cfg.schedule()) {
    if (cfg.steps < 1) throw ValueError(str_cat("Trainer: steps must be >= 1, got ", cfg.steps));
  }

  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  /// Gives the model back its own parameter storage (it lived in the trainer's buffer), so the model stays usable.
  ~Trainer() {
    for_each_param(*model_, [](const std::string&, Param<T>& p) { p = Param<T>(p); });
  }

  const TrainConfig& config() const { return cfg_; }
  Model& model() { return *model_; }
  ParamBuffer<T>& buffer() { return buffer_; }
  Optimizer<T>& optimizer() { return optimizer_; }
  DataParallel<Task>& parallel() { return parallel_; }
  History& history() { return history_; }
  const History& history() const { return history_; }
  /// Optimiser steps done so far.
  Index step() const { return step_; }

  /// One optimiser step on `batch`.
  StepStats train_step(const Batch& batch) {
    const auto t0 = std::chrono::steady_clock::now();
    buffer_.zero_grad();
    const ShardResult r = parallel_.run(batch, Mode::train, data::mix_seed(cfg_.seed ^ kDropoutStream, std::uint64_t(step_)), true);
    StepStats s;
    s.grad_norm = optim::clip_grad_norm(buffer_, cfg_.clip_norm);
    s.lr = schedule_.lr(step_);
    optimizer_.step(s.lr);
    ++step_;
    s.step = step_;
    s.loss = r.loss();
    s.accuracy = r.accuracy();
    s.tokens = r.tokens;
    s.density = r.activity.densities();
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    history_.record(s);
    return s;
  }

  /// An evaluation pass over one batch (eval mode: no dropout, no gradients).
  ShardResult evaluate_batch(const Batch& batch) { return parallel_.run(batch, Mode::eval, 0, false); }

  /// Evaluation over every batch `next(batch)` yields (it returns false after the last).
  template <class Next>
  ShardResult evaluate(Next&& next) {
    ShardResult total;
    Batch b;
    while (next(b)) total.add(evaluate_batch(b));
    return total;
  }

  /// Saves model, optimiser, step, configuration and history atomically (see checkpoint.hpp).
  void save(const std::string& path, std::map<std::string, std::string> metadata = {},
            const io::AtomicWriteOptions& options = {}) {
    metadata["train_config"] = cfg_.to_json().dump();
    metadata["history"] = history_.to_json().dump();
    save_checkpoint(path, *model_, optimizer_, step_, metadata, options);
  }

  /// Restores a checkpoint written by save(): model, optimiser state, step and history (records after the saved
  /// step are dropped). The seed must be the one the checkpoint was trained with (ValueError otherwise).
  CheckpointInfo resume(const std::string& path) {
    CheckpointInfo info = load_checkpoint(path, *model_, optimizer_);
    if (info.metadata.count("train_config")) {
      const auto tc = nlohmann::json::parse(info.metadata["train_config"]);
      if (tc.contains("seed") && tc["seed"].get<std::string>() != std::to_string(cfg_.seed))
        throw ValueError(str_cat(path, ": trained with seed ", tc["seed"].get<std::string>(), ", resumed with seed ",
                                 cfg_.seed, " (the batches and dropout masks would differ)"));
    }
    step_ = info.step;
    history_ = info.metadata.count("history") ? History::from_json(nlohmann::json::parse(info.metadata["history"]))
                                              : History{};
    history_.truncate(step_);
    return info;
  }

  /// Trains from the current step to config().steps: batches from `opt.batch`, a progress bar, evaluations and
  /// checkpoints as asked. Returns the history.
  const History& fit(const FitOptions<Batch>& opt) {
    if (!opt.batch) throw ValueError("Trainer::fit: FitOptions::batch is required");
    ProgressBar bar(cfg_.steps, opt.progress_out, opt.progress_interval);
    bar.start(step_);
    double loss_avg = 0, acc_avg = 0, tps_avg = 0;
    std::vector<double> dens_avg;
    bool first = true;
    const auto t_fit = std::chrono::steady_clock::now();
    auto save_now = [&]() {
      if (opt.checkpoint_path.empty()) return;
      save(opt.checkpoint_path, opt.checkpoint_metadata ? opt.checkpoint_metadata() : std::map<std::string, std::string>{});
    };
    while (step_ < cfg_.steps) {
      if (opt.stop_after >= 0 && step_ >= opt.stop_after) break;
      if (opt.time_limit > 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_fit).count() >= opt.time_limit) {
        if (opt.progress) bar.message(str_cat("time limit of ", fixed(opt.time_limit, 0), " s reached at step ", step_));
        break;
      }
      const StepStats s = train_step(opt.batch(step_));
      // Smoothed over about 20 steps for a readable bar; the history keeps the raw values.
      const double a = first ? 1.0 : 0.05;
      loss_avg += a * (s.loss - loss_avg);
      acc_avg += a * (s.accuracy - acc_avg);
      tps_avg += a * (s.tokens_per_second() - tps_avg);
      if (first) dens_avg = s.density;
      for (std::size_t i = 0; i < dens_avg.size() && i < s.density.size(); ++i) dens_avg[i] += a * (s.density[i] - dens_avg[i]);
      first = false;
      if (opt.on_step) opt.on_step(s);
      if (opt.eval_every > 0 && opt.evaluate && step_ % opt.eval_every == 0 && step_ < cfg_.steps) {
        const ShardResult e = opt.evaluate();
        history_.record_eval(step_, e.loss(), e.accuracy());
        if (opt.progress)
          bar.message(str_cat("step ", step_, ": eval loss ", fixed(e.loss(), 4), ", accuracy ", fixed(100 * e.accuracy(), 2), "%"));
      }
      if (opt.checkpoint_every > 0 && step_ % opt.checkpoint_every == 0) save_now();
      if (opt.progress) {
        bar.update(step_, str_cat("loss ", fixed(loss_avg, 3), " acc ", fixed(100 * acc_avg, 1), "% ",
                                  format_count(tps_avg), " tok/s dens ", format_density(dens_avg)));
      }
    }
    if (opt.progress) bar.finish();
    save_now();
    return history_;
  }

 private:
  static constexpr std::uint64_t kDropoutStream = 0xd509a7c1e55ULL;
  static std::string fixed(double v, int digits) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
  }

  TrainConfig cfg_;
  Model* model_;
  ParamBuffer<T> buffer_;
  Optimizer<T> optimizer_;
  DataParallel<Task> parallel_;
  optim::Schedule schedule_;
  History history_;
  Index step_ = 0;
};

}  // namespace sma::train
