// The device optimiser configuration that matches a sma::train::OptimizerConfig (the model tests train both sides
// with the same rule; the device models decay the matrices, as decay_matrices_only does).
#pragma once

#include <sma/cuda/optimizer.hpp>
#include <sma/train/optimizer.hpp>

namespace sma::cuda_test {

inline cuda::DeviceOptimizerConfig device_optimizer(const train::OptimizerConfig& oc, double clip_norm = 0) {
  cuda::DeviceOptimizerConfig c;
  c.kind = cuda::parse_device_optimizer(train::to_string(oc.kind));
  c.beta1 = oc.beta1;
  c.beta2 = oc.beta2;
  c.eps = oc.eps;
  c.momentum = oc.momentum;
  c.nesterov = oc.nesterov;
  c.weight_decay = oc.weight_decay;
  c.clip_norm = clip_norm;
  return c;
}

}  // namespace sma::cuda_test
