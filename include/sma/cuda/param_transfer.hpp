// sma/cuda/param_transfer.hpp: moving parameters between a CPU model (anything with visit_params over Param<float>)
// and its device copy, by official name: what the device classes' from_cpu, add_grads_to and copy_params_to share.
// Host header, no CUDA header.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/param.hpp>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda::detail {

/// For a device model's constructor: the values of the CPU model's parameters outside its layers (`in_layer(name)`
/// false: the device layers bring their own) by official name, and every parameter's `Info` {name, trainable,
/// decay} in the CPU visiting order, with decay on matrices (rank >= 2) as sma::train::Optimizer decides by default.
template <class Model, class InLayer, class Info>
void collect_host_params(Model& cpu, InLayer in_layer, std::vector<std::pair<std::string, std::vector<float>>>& params,
                         std::vector<Info>& info) {
  cpu.visit_params([&](const auto& name_, Param<float>& p) {
    const std::string name(name_);
    info.push_back({name, p.trainable(), p.rank() >= 2});
    if (!in_layer(name)) params.emplace_back(name, std::vector<float>(p.data(), p.data() + p.size()));
  });
}

/// What write_host_params writes into: the CPU parameters' gradients (added to) or their values (replaced).
enum class HostTarget { add_to_grads, values };

/// Writes `read(name)` (the device's host copy of a parameter or its gradient) into every parameter of the CPU model.
/// `who` ("SeqBoatLmDevice::add_grads_to") names the caller in the ShapeError for a size that differs.
template <class Model, class Read>
void write_host_params(Model& cpu, HostTarget target, const char* who, Read read) {
  cpu.visit_params([&](const auto& name_, Param<float>& p) {
    const std::string name(name_);
    const std::vector<float> v = read(name);
    if (static_cast<Index>(v.size()) != p.size())
      throw ShapeError(str_cat(who, ": ", name, " has ", v.size(), " device entries for ", p.size(), " host ones"));
    if (target == HostTarget::add_to_grads)
      for (Index i = 0; i < p.size(); ++i) p.grad()[i] += v[static_cast<std::size_t>(i)];
    else
      for (Index i = 0; i < p.size(); ++i) p.data()[i] = v[static_cast<std::size_t>(i)];
  });
}

}  // namespace sma::cuda::detail
