// sma/io/state_dict.hpp: models <-> safetensors under the official PyTorch names (the visit_params paths).
//
// A `state_dict()` of the official model saved with safetensors loads directly, and a file saved here loads in
// PyTorch (`load_state_dict(safetensors.torch.load_file(...))`). Loading is strict by default: every parameter and
// buffer of the model must be in the file with the same shape, and (unless `allow_extra`) the file must not hold
// parameters the model lacks; the first problem is reported by name. Values convert from any float dtype.
#pragma once

#include <sma/core/param.hpp>
#include <sma/io/safetensors.hpp>

#include <functional>
#include <set>
#include <string>
#include <vector>

namespace sma::io {

struct LoadOptions {
  bool allow_missing = false;  ///< parameters absent from the file keep their values
  bool allow_extra = false;    ///< names in the file that the model lacks are ignored
  /// Names in the file that are never parameters (inputs, outputs, gradients of a golden case...).
  std::function<bool(const std::string&)> ignore = nullptr;
  std::string prefix;          ///< read "<prefix><name>" (e.g. "model.")
};

/// Loads every Param of `model` from `file`. Throws KeyError (missing/unexpected name) or ShapeError (shape).
template <class Model>
void load_state_dict(Model& model, const SafetensorsFile& file, const LoadOptions& opt = {}) {
  std::set<std::string> used;
  for_each_param(model, [&](const std::string& name, auto& p) {
    using T = typename std::decay_t<decltype(p)>::Scalar;
    const std::string key = opt.prefix + name;
    if (!file.contains(key)) {
      if (opt.allow_missing) return;
      throw KeyError(str_cat("load_state_dict: '", key, "' is missing from ", file.path(), " (expected shape ",
                             shape_string(p.shape()), ")"));
    }
    used.insert(key);
    const auto& info = file.info(key);
    std::vector<Index> shape(info.shape.begin(), info.shape.end());
    if (shape != p.shape())
      throw ShapeError(str_cat("load_state_dict: '", key, "' in ", file.path(), " has shape ", shape_string(shape),
                               ", the model expects ", shape_string(p.shape())));
    const std::vector<double> values = file.values_as_double(key);
    for (Index i = 0; i < p.size(); ++i) p.data()[i] = static_cast<T>(values[static_cast<std::size_t>(i)]);
  });
  if (opt.allow_extra) return;
  for (const auto& name : file.names()) {
    if (used.count(name) || (opt.ignore && opt.ignore(name))) continue;
    if (!opt.prefix.empty() && name.compare(0, opt.prefix.size(), opt.prefix) != 0) continue;
    throw KeyError(str_cat("load_state_dict: ", file.path(), " holds '", name,
                           "', which the model does not have (set allow_extra to ignore it)"));
  }
}

/// Adds every Param of `model` to `writer` under its official name (F32 or F64 as the Param's scalar).
template <class Model>
void add_state_dict(Model& model, SafetensorsWriter& writer, const std::string& prefix = "") {
  for_each_param(model, [&](const std::string& name, auto& p) {
    writer.add(prefix + name, p.data(), p.shape());
  });
}

}  // namespace sma::io
