// sma/train/optimizer.hpp: one object for the optimisers of sma/optim (AdamW, RAdam, SGD with momentum), chosen at
// run time, with the usual weight-decay rule and a uniform view of its state for checkpoints.
#pragma once

#include <sma/core/param.hpp>
#include <sma/optim/adam.hpp>
#include <sma/optim/sgd.hpp>

#include <nlohmann/json.hpp>

#include <optional>
#include <set>
#include <string>
#include <vector>

namespace sma::train {

enum class OptimizerKind : std::uint8_t { adamw, radam, sgd };

inline const char* to_string(OptimizerKind k) {
  return k == OptimizerKind::adamw ? "adamw" : k == OptimizerKind::radam ? "radam" : "sgd";
}
inline OptimizerKind parse_optimizer(const std::string& s) {
  if (s == "adamw" || s == "adam") return OptimizerKind::adamw;
  if (s == "radam") return OptimizerKind::radam;
  if (s == "sgd") return OptimizerKind::sgd;
  throw ValueError(str_cat("unknown optimiser '", s, "' (expected adamw, radam or sgd)"));
}

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::adamw;
  double beta1 = 0.9, beta2 = 0.98, eps = 1e-8;  ///< Adam variants
  double momentum = 0.9;                         ///< SGD
  bool nesterov = false;                         ///< SGD
  double weight_decay = 0.01;
  /// Weight decay only on matrices (rank >= 2 parameters: projection and embedding weights), not on biases, norm
  /// scales, EMA coefficients, position biases or the router temperature (common practice: decaying those
  /// pulls them towards 0, which is not a simpler model).
  bool decay_matrices_only = true;

  nlohmann::json to_json() const {
    return {{"kind", to_string(kind)}, {"beta1", beta1}, {"beta2", beta2},       {"eps", eps},
            {"momentum", momentum},    {"nesterov", nesterov}, {"weight_decay", weight_decay},
            {"decay_matrices_only", decay_matrices_only}};
  }
};

/// AdamW, RAdam or SGD over one ParamBuffer.
template <class T>
class Optimizer {
 public:
  Optimizer(ParamBuffer<T>& buffer, const OptimizerConfig& cfg) : cfg_(cfg) {
    std::set<std::string> matrices;
    for (const auto& e : buffer.entries())
      if (e.param->rank() >= 2) matrices.insert(e.name);
    const bool only = cfg.decay_matrices_only;
    optim::TrainableView<T> view(buffer, [&](const std::string& name) { return !only || matrices.count(name) != 0; });
    if (cfg.kind == OptimizerKind::sgd) {
      typename optim::Sgd<T>::Config c;
      c.momentum = cfg.momentum;
      c.nesterov = cfg.nesterov;
      c.weight_decay = cfg.weight_decay;
      sgd_.emplace(buffer, c, std::move(view));
    } else {
      typename optim::Adam<T>::Config c;
      c.beta1 = cfg.beta1;
      c.beta2 = cfg.beta2;
      c.eps = cfg.eps;
      c.weight_decay = cfg.weight_decay;
      c.variant = cfg.kind == OptimizerKind::radam ? optim::AdamVariant::radam : optim::AdamVariant::adamw;
      adam_.emplace(buffer, c, std::move(view));
    }
  }

  const OptimizerConfig& config() const { return cfg_; }
  const char* name() const { return to_string(cfg_.kind); }
  Index steps() const { return adam_ ? adam_->steps() : sgd_->steps(); }

  /// One update with learning rate `lr` from the buffer's gradients.
  void step(double lr) {
    if (adam_)
      adam_->step(lr);
    else
      sgd_->step(lr);
  }

  /// v(name, std::vector<double>&) for every state vector ("step", then "exp_avg"/"exp_avg_sq" or
  /// "momentum_buffer"); a visitor may resize nothing, only read or overwrite the values.
  template <class V>
  void visit_state(V&& v) {
    if (adam_)
      adam_->visit_state(v);
    else
      sgd_->visit_state(v);
  }

 private:
  OptimizerConfig cfg_;
  std::optional<optim::Adam<T>> adam_;
  std::optional<optim::Sgd<T>> sgd_;
};

}  // namespace sma::train
