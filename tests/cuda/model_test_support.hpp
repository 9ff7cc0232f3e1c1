// Helpers of the CUDA tests that compare a device layer or model with the CPU one in double (the reference) and
// float (the error budget): widened router margins, one set of values for both CPU copies, padded row tails, the
// routing, logits, loss and gradient checks, the CPU side of the optimiser comparison with its check after the steps,
// and a narrow layer for the misuse cases.
#pragma once

#include "cuda_test_support.hpp"
#include "optimizer_setup.hpp"

#include <sma/core/param.hpp>
#include <sma/cuda/adamw.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/loss.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/models/lm.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/optimizer.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace sma::cuda_test {

/// The small classifier of the device model tests: 2 layers, D 24, Z 16, N 4, window 8.
inline SeqBoatModelConfig small_model_config() {
  SeqBoatModelConfig c;
  c.d_input = 3;
  c.d_output = 5;
  c.d_model = 24;
  c.n_layers = 2;
  c.dropout = 0;
  c.max_positions = 128;
  c.d_qk = 16;
  c.d_ema = 4;
  c.mem_size = 8;
  return c;
}

/// The small causal LM of the device LM tests: V 37, 2 layers with feed-forward blocks, D 24, window 8 (shorter than
/// the activated counts of their rows).
inline SeqBoatLmConfig small_lm_config() {
  SeqBoatLmConfig c;
  c.vocab_size = 37;
  c.embed_dim = 24;
  c.hidden_dim = 48;
  c.zdim = 16;
  c.ndim = 4;
  c.ffn_hidden_dim = 40;
  c.layers = 2;
  c.window_size = 8;
  c.max_positions = 128;
  return c;
}

/// small_lm_config post-norm: rmsnorm, gelu blocks, rotary positions, relu2 attention, unscaled embeddings.
inline SeqBoatLmConfig postnorm_rotary_lm_config() {
  SeqBoatLmConfig c = small_lm_config();
  c.prenorm = false;
  c.norm_type = NormType::rmsnorm;
  c.activation = Activation::gelu;
  c.rel_pos = ops::PositionEncoding::rotary;
  c.attention_activation = ops::AttentionActivation::relu2;
  c.scale_embedding = false;
  return c;
}

/// The Euclidean norm of a - b over n elements.
inline double norm_diff(const float* a, const double* b, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

/// Widens the router margin of the layer whose parameters are named `prefix` + name in the double model: the two
/// logit rows of hx_proj drawn larger (0.8 N(0, 1)), so that no token's decision is a near tie that double and float
/// could take differently; small random values (0.1 N(0, 1)) for the zero-initialised GAU biases and beta so that
/// their gradients are exercised. `rng` and `nd` go on to draw the caller's inputs.
inline void widen_router_margin(std::map<std::string, Param<double>*>& pd, const std::string& prefix, Index D,
                                std::mt19937& rng, std::normal_distribution<double>& nd) {
  for (Index i = 0; i < 2 * D; ++i) pd.at(prefix + "hx_proj.weight")->data()[i] = 0.8 * nd(rng);
  for (const char* n : {"beta", "mx_proj.bias", "h_proj.bias"})
    for (Index i = 0; i < pd.at(prefix + n)->size(); ++i) pd.at(prefix + n)->data()[i] = 0.1 * nd(rng);
}

/// The float model takes the double model's values, and the double model those values back (rounded to float):
/// both CPU paths then start from the same numbers as the device copy of the float model.
inline void share_values(std::map<std::string, Param<double>*>& pd, std::map<std::string, Param<float>*>& pf) {
  for (auto& [n, p] : pd) {
    Param<float>& f = *pf.at(n);
    REQUIRE(f.size() == p->size());
    for (Index i = 0; i < p->size(); ++i) {
      f.data()[i] = static_cast<float>(p->data()[i]);
      p->data()[i] = static_cast<double>(f.data()[i]);
    }
  }
}

/// A (B, L) padding mask as the CPU takes it and as the device takes it (B*L bytes); 1 = pad.
struct Padding {
  Mask mask;
  std::vector<std::uint8_t> flat;
};

/// Ragged rows (`ragged`): the last 7 b positions of every row b >= 1 padded; else no padding.
inline Padding row_tail_padding(int B, int L, bool ragged = true) {
  Padding p{Mask(B, L), std::vector<std::uint8_t>(static_cast<std::size_t>(B) * L, 0)};
  p.mask.setZero();
  if (ragged)
    for (int b = 1; b < B; ++b)
      for (int t = L - 7 * b; t < L; ++t) {
        p.mask(b, t) = 1;
        p.flat[static_cast<std::size_t>(b) * L + t] = 1;
      }
  return p;
}

/// Every layer's routing decisions on the device (`dev`: a device model with n_layers() and layer(l)) equal the
/// CPU model's (double) in `cache`. `near_ties`: after training steps the device's float weights have drifted from
/// the double ones by rounding, so a token whose two router probabilities (in double) are within kTieMargin may go
/// either way; at most one such token per layer is let through.
constexpr double kTieMargin = 1e-4;

template <class Cache, class DeviceModel>
void require_same_routing(const Cache& cache, DeviceModel& dev, int B, int L, void* s, const char* when,
                          bool near_ties = false) {
  for (int l = 0; l < dev.n_layers(); ++l) {
    const std::vector<std::uint8_t> act = dev.layer(l).active(s);
    const auto& router = cache.layers[static_cast<std::size_t>(l)].router;
    int differ = 0, ties = 0, on = 0;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < L; ++t) {
        const std::uint8_t a = act[static_cast<std::size_t>(b) * L + t];
        on += a;
        if (router.active(b, t) == a) continue;
        const Index i = static_cast<Index>(b) * L + t;
        const bool tie = std::abs(double(router.probs(i, 1)) - double(router.probs(i, 0))) < kTieMargin;
        if (near_ties && tie)
          ++ties;
        else
          ++differ;
      }
    INFO(when << "layer " << l << ": " << on << " active tokens of " << B * L << ", " << ties << " near ties");
    REQUIRE(differ == 0);
    REQUIRE(ties <= 1);
  }
}

/// The device's logits (d_logits) and loss (lv, with `counted` targets) against the CPU model's in double (yd, lossd),
/// with the float CPU path's errors (yf, lossf) for the budget. Returns the logits' accuracy.
template <class YF, class YD>
Accuracy check_logits_and_loss(const cuda::DeviceArray<float>& d_logits, const YF& yf, const YD& yd,
                               const cuda::CrossEntropyValue& lv, double lossd, double lossf, long long counted,
                               double floor) {
  const std::vector<float> lg = d_logits.download();
  const Accuracy a = accuracy(lg.data(), yf.data(), yd.data(), lg.size(), floor);
  INFO("logits: " << a);
  CHECK(a.ok());
  const double el = std::abs(lv.loss - lossd), ef = std::abs(lossf - lossd);
  INFO("loss " << lv.loss << " (double " << lossd << ", float " << lossf << ")");
  CHECK(el <= 2 * ef + 1e-5 * std::abs(lossd));
  CHECK(lv.counted == counted);
  return a;
}

/// Every parameter gradient on the device against the CPU's (double reference, float budget); for a buffer
/// (batchnorm running statistics, not trainable) its values after the train-mode forward instead.
template <class DeviceModel>
void check_gradients(DeviceModel& dev, const std::map<std::string, Param<double>*>& pd,
                     const std::map<std::string, Param<float>*>& pf, void* s, double floor) {
  for (auto& [n, p] : pd) {
    const std::vector<float> g = dev.grad(n, s);
    REQUIRE(g.size() == static_cast<std::size_t>(p->size()));
    if (!p->trainable()) {
      const std::vector<float> v = dev.param(n, s);
      const Accuracy a = accuracy(v.data(), pf.at(n)->data(), p->data(), v.size(), floor);
      INFO("buffer " << n << ": " << a);
      CHECK(a.ok());
      continue;
    }
    const Accuracy a = accuracy(g.data(), pf.at(n)->grad(), p->grad(), g.size(), floor);
    INFO("d " << n << ": " << a);
    CHECK(a.ok());
  }
}

/// One device layer of `lc`'s configuration but 8 wide (hdim 16): a layer that a wider model must refuse.
inline std::vector<cuda::SeqBoatLayerDevice> narrow_layers(SeqBoatLayerConfig lc) {
  std::vector<cuda::SeqBoatLayerDevice> layers;
  lc.embed_dim = 8;
  lc.hdim = 16;
  SeqBoatLayer<float> l8(lc, 1);
  layers.push_back(cuda::SeqBoatLayerDevice::from_cpu(l8));
  return layers;
}

/// The values of every parameter, by name (the start of the optimiser steps).
inline std::map<std::string, std::vector<double>> snapshot(const std::map<std::string, Param<double>*>& pd) {
  std::map<std::string, std::vector<double>> w;
  for (auto& [n, p] : pd) w[n] = std::vector<double>(p->data(), p->data() + p->size());
  return w;
}

/// The CPU side of the optimiser comparison: the double and the float model over flat parameter buffers (which
/// rebind their Params: take params_of again afterwards), each stepped by sma::train::Optimizer (decay on matrices
/// only, weight decay 0.05; SGD with Nesterov momentum), and the device optimiser set to the same rule.
struct CpuOptimizer {
  train::OptimizerConfig oc;
  ParamBuffer<double> bd;
  ParamBuffer<float> bf;
  train::Optimizer<double> od;
  train::Optimizer<float> of;

  template <class ModelD, class ModelF>
  CpuOptimizer(ModelD& md, ModelF& mf, train::OptimizerKind kind = train::OptimizerKind::adamw)
      : oc(config(kind)), bd(md), bf(mf), od(bd, oc), of(bf, oc) {}

  static train::OptimizerConfig config(train::OptimizerKind kind) {
    train::OptimizerConfig c;
    c.kind = kind;
    c.nesterov = kind == train::OptimizerKind::sgd;
    c.weight_decay = 0.05;
    return c;
  }

  /// Sets `dev`'s optimiser to the same rule: DeviceAdamW for AdamW, DeviceOptimizer for the others.
  template <class DeviceModel>
  void set_on(DeviceModel& dev, double clip_norm = 0) const {
    if (oc.kind == train::OptimizerKind::adamw) {
      cuda::AdamWConfig ac;
      ac.beta1 = oc.beta1;
      ac.beta2 = oc.beta2;
      ac.eps = oc.eps;
      ac.weight_decay = oc.weight_decay;
      ac.clip_norm = clip_norm;
      dev.set_optimizer(ac);
    } else {
      dev.set_optimizer(device_optimizer(oc, clip_norm));
    }
  }

  void step(double lr) {
    od.step(lr);
    of.step(lr);
  }
};

/// After `steps` optimiser steps from `w0`: each device parameter against the double CPU model's. fp32 moments and update
/// against the CPU's doubles: the difference must be small against the update itself, beyond twice the float CPU
/// path's.
template <class DeviceModel>
void check_params_after_steps(DeviceModel& dev, const std::map<std::string, Param<double>*>& pd,
                              const std::map<std::string, Param<float>*>& pf,
                              const std::map<std::string, std::vector<double>>& w0, void* s, int steps = 3) {
  for (auto& [n, p] : pd) {
    const std::vector<float> v = dev.param(n, s);
    const std::size_t k = v.size();
    const double upd = norm_diff(pf.at(n)->data(), w0.at(n).data(), k);  // float CPU's update (vs the start)
    double upd_d = 0;
    for (std::size_t i = 0; i < k; ++i) upd_d += (p->data()[i] - w0.at(n)[i]) * (p->data()[i] - w0.at(n)[i]);
    upd_d = std::sqrt(upd_d);
    const double e_dev = norm_diff(v.data(), p->data(), k), e_f = norm_diff(pf.at(n)->data(), p->data(), k);
    INFO("after " << steps << " steps, " << n << ": |dev - double| " << e_dev << ", |float - double| " << e_f
                  << ", |update| " << upd_d << " (float " << upd << ")");
    CHECK(e_dev <= 2 * e_f + 1e-2 * upd_d + 1e-7);
  }
}

}  // namespace sma::cuda_test
