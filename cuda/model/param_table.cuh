// cuda/model/param_table.cuh: the parameter table of a device model (the classifier, the LM): every parameter's
// value and gradient storage in the CPU model's visiting order, the storage of the parameters the model owns itself
// (its layers own theirs), and what a model does over all of them: zeroing the gradients, the AdamW ranges,
// host copies.
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/adamw.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/seqboat_model_device.hpp>

#include "../common/check.cuh"

#include <cuda_runtime.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace sma::cuda::detail {

class ParamTable {
 public:
  struct Ref {
    std::string name;
    float* value = nullptr;
    float* grad = nullptr;
    long long size = 0;
    bool trainable = true, decay = true;
  };

  /// `who` prefixes every error message (the model's class name).
  explicit ParamTable(std::string who = "model") : who_(std::move(who)) {}

  /// A parameter the model stores itself (its values uploaded, its gradient 0).
  void own(const std::string& name, const std::vector<float>& values) {
    value_.emplace(name, DeviceArray<float>(values));
    grad_.emplace(name, DeviceArray<float>(std::vector<float>(values.size(), 0.f)));
  }
  bool owns(const std::string& name) const { return value_.count(name) != 0; }
  std::size_t owned_size(const std::string& name) const {
    auto it = value_.find(name);
    return it == value_.end() ? 0 : it->second.size();
  }
  /// The owned parameter's value / gradient storage, nullptr when the model has no such parameter.
  float* p(const std::string& name) const {
    auto it = value_.find(name);
    return it == value_.end() ? nullptr : it->second.data();
  }
  float* g(const std::string& name) const {
    auto it = grad_.find(name);
    return it == grad_.end() ? nullptr : it->second.data();
  }

  /// Lists every parameter in the order of `info` (the CPU visiting order): from `layer_refs` (by full name) or the
  /// owned storage. Throws ValueError when a name has no storage or storage has no name.
  void bind(const std::vector<DeviceParamInfo>& info, const std::map<std::string, DeviceParamRef>& layer_refs) {
    refs_.clear();
    index_.clear();
    for (const DeviceParamInfo& in : info) {
      Ref r{in.name, nullptr, nullptr, 0, in.trainable, in.decay};
      if (auto it = layer_refs.find(in.name); it != layer_refs.end()) {
        r.value = it->second.value;
        r.grad = it->second.grad;
        r.size = it->second.size;
      } else if (auto jt = value_.find(in.name); jt != value_.end()) {
        r.value = jt->second.data();
        r.grad = grad_.at(in.name).data();
        r.size = static_cast<long long>(jt->second.size());
      } else {
        throw ValueError(str_cat(who_, ": parameter ", in.name, " has no device storage"));
      }
      index_[in.name] = refs_.size();
      refs_.push_back(r);
    }
    if (refs_.size() != layer_refs.size() + value_.size())
      throw ValueError(str_cat(who_, ": ", layer_refs.size() + value_.size(), " device parameters but ", refs_.size(),
                               " named in the parameter list"));
  }

  const std::vector<Ref>& refs() const { return refs_; }
  /// KeyError for an unknown name.
  const Ref& at(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) throw KeyError(str_cat(who_, ": no parameter ", name));
    return refs_[it->second];
  }

  void zero_grad(cudaStream_t s) const {
    for (const Ref& r : refs_) SMA_CUDA_CHECK(cudaMemsetAsync(r.grad, 0, r.size * sizeof(float), s));
  }
  std::vector<AdamWRange> adamw_ranges() const {
    std::vector<AdamWRange> out;
    for (const Ref& r : refs_)
      if (r.trainable) out.push_back({r.value, r.grad, r.size, r.decay});
    return out;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Ref& r : refs_) out.push_back(r.name);
    return out;
  }
  /// Host copies, taken after the work queued on `s`.
  std::vector<float> value(const std::string& name, cudaStream_t s) const { return download(at(name).value, name, s); }
  std::vector<float> grad(const std::string& name, cudaStream_t s) const { return download(at(name).grad, name, s); }

 private:
  std::vector<float> download(const float* p, const std::string& name, cudaStream_t s) const {
    const long long n = at(name).size;
    std::vector<float> v(static_cast<std::size_t>(n));
    if (n > 0) SMA_CUDA_CHECK(cudaMemcpyAsync(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost, s));
    SMA_CUDA_CHECK(cudaStreamSynchronize(s));
    return v;
  }

  std::string who_;
  std::map<std::string, DeviceArray<float>> value_, grad_;
  std::vector<Ref> refs_;
  std::map<std::string, std::size_t> index_;
};

}  // namespace sma::cuda::detail
