// sma/optim/adam.hpp: AdamW (Adam with decoupled weight decay, Loshchilov & Hutter) and RAdam (Liu et al. 2020,
// the update PyTorch's torch.optim.RAdam implements), over one ParamBuffer.
//
// State: step count and the first/second moment vectors, exposed through visit_state(v) as
// v("step", ...), v("exp_avg", ...), v("exp_avg_sq", ...) so checkpoints can save them and training resumes exactly.
#pragma once

#include <sma/optim/optimizer.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace sma::optim {

enum class AdamVariant { adamw, radam };

template <class T>
class Adam {
 public:
  struct Config {
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    double weight_decay = 0.0;  ///< decoupled: theta -= lr * wd * theta
    AdamVariant variant = AdamVariant::adamw;
  };

  Adam(ParamBuffer<T>& buf, Config cfg, TrainableView<T> view)
      : buf_(&buf), cfg_(cfg), view_(std::move(view)),
        m_(static_cast<std::size_t>(buf.size()), 0.0), v_(static_cast<std::size_t>(buf.size()), 0.0) {
    if (!(cfg.beta1 >= 0 && cfg.beta1 < 1 && cfg.beta2 >= 0 && cfg.beta2 < 1))
      throw ValueError(str_cat("Adam: betas must be in [0, 1), got ", cfg.beta1, ", ", cfg.beta2));
    if (!(cfg.eps > 0)) throw ValueError(str_cat("Adam: eps must be > 0, got ", cfg.eps));
  }
  Adam(ParamBuffer<T>& buf, Config cfg) : Adam(buf, cfg, TrainableView<T>(buf)) {}

  const Config& config() const { return cfg_; }
  Index steps() const { return step_; }

  /// One update with learning rate `lr` from the gradients in the buffer (which are left as they are).
  void step(double lr) {
    ++step_;
    const double b1 = cfg_.beta1, b2 = cfg_.beta2, t = double(step_);
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    // RAdam's variance rectification; below rho 5 it falls back to un-adapted momentum SGD.
    double rect = 1;
    bool adaptive = true;
    if (cfg_.variant == AdamVariant::radam) {
      const double rho_inf = 2 / (1 - b2) - 1;
      const double rho_t = rho_inf - 2 * t * std::pow(b2, t) / bc2;
      adaptive = rho_t > 5;
      if (adaptive)
        rect = std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t));
    }
    T* w = buf_->values();
    const T* g = buf_->grads();
    for (const auto& r : view_.ranges) {
      const double wd = r.decay ? cfg_.weight_decay : 0.0;
      for (Index i = r.offset; i < r.offset + r.size; ++i) {
        const std::size_t k = static_cast<std::size_t>(i);
        const double gi = double(g[i]);
        m_[k] = b1 * m_[k] + (1 - b1) * gi;
        v_[k] = b2 * v_[k] + (1 - b2) * gi * gi;
        double wi = double(w[i]) * (1 - lr * wd);
        const double mhat = m_[k] / bc1;
        if (adaptive)
          wi -= lr * rect * mhat / (std::sqrt(v_[k] / bc2) + cfg_.eps);
        else
          wi -= lr * mhat;
        w[i] = static_cast<T>(wi);
      }
    }
  }

  /// v(name, std::vector<double>&) for each state vector, and v("step", std::vector<double>&) holding the count.
  template <class V>
  void visit_state(V&& v) {
    std::vector<double> s{double(step_)};
    v("step", s);
    step_ = static_cast<Index>(s.at(0));
    v("exp_avg", m_);
    v("exp_avg_sq", v_);
  }

 private:
  ParamBuffer<T>* buf_;
  Config cfg_;
  TrainableView<T> view_;
  std::vector<double> m_, v_;
  Index step_ = 0;
};

}  // namespace sma::optim
