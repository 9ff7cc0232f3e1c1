// sma/optim/sgd.hpp: SGD with (optionally Nesterov) momentum and L2 weight decay, PyTorch's update rule.
#pragma once

#include <sma/optim/optimizer.hpp>

#include <vector>

namespace sma::optim {

template <class T>
class Sgd {
 public:
  struct Config {
    double momentum = 0.9;
    double weight_decay = 0.0;  ///< L2: g += wd * theta
    bool nesterov = false;
  };

  Sgd(ParamBuffer<T>& buf, Config cfg, TrainableView<T> view)
      : buf_(&buf), cfg_(cfg), view_(std::move(view)), mom_(static_cast<std::size_t>(buf.size()), 0.0) {
    if (!(cfg.momentum >= 0 && cfg.momentum < 1))
      throw ValueError(str_cat("Sgd: momentum must be in [0, 1), got ", cfg.momentum));
  }
  Sgd(ParamBuffer<T>& buf, Config cfg) : Sgd(buf, cfg, TrainableView<T>(buf)) {}

  Index steps() const { return step_; }

  void step(double lr) {
    T* w = buf_->values();
    const T* g = buf_->grads();
    for (const auto& r : view_.ranges) {
      const double wd = r.decay ? cfg_.weight_decay : 0.0;
      for (Index i = r.offset; i < r.offset + r.size; ++i) {
        const std::size_t k = static_cast<std::size_t>(i);
        const double gi = double(g[i]) + wd * double(w[i]);
        mom_[k] = step_ == 0 ? gi : cfg_.momentum * mom_[k] + gi;
        const double d = cfg_.nesterov ? gi + cfg_.momentum * mom_[k] : mom_[k];
        w[i] = static_cast<T>(double(w[i]) - lr * d);
      }
    }
    ++step_;
  }

  template <class V>
  void visit_state(V&& v) {
    std::vector<double> s{double(step_)};
    v("step", s);
    step_ = static_cast<Index>(s.at(0));
    v("momentum_buffer", mom_);
  }

 private:
  ParamBuffer<T>* buf_;
  Config cfg_;
  TrainableView<T> view_;
  std::vector<double> mom_;
  Index step_ = 0;
};

}  // namespace sma::optim
