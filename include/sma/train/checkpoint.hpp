// sma/train/checkpoint.hpp: training checkpoints and model weights in one safetensors file.
//
// LAYOUT   (all tensor names sorted in the file, as safetensors requires)
//   <official name>        every parameter and buffer of the model under its PyTorch state_dict name, in the model's
//                          scalar dtype (F32 for float), except BatchNorm's `num_batches_tracked`, stored as I64 as
//                          PyTorch does. A state_dict of the official model saved with safetensors is exactly this
//                          part, so it loads directly (load_weights), and this part loads in PyTorch.
//   optimizer.<state>      F64 [n]: the optimiser's state vectors (optimizer.step [1], optimizer.exp_avg and
//                          optimizer.exp_avg_sq for Adam variants, optimizer.momentum_buffer for SGD), n = the
//                          model's ParamBuffer size.
//   trainer.step           I64 []: optimiser steps taken.
//   __metadata__           format = "sma-checkpoint-v1", kind = "checkpoint" | "weights", scalar = "F32" | "F64",
//                          optimizer = its name, plus whatever the caller adds (the trainer adds model_config,
//                          train_config, history and data_position, each as JSON text).
// LOADING  Everything is validated before anything is changed: every model tensor present, with the model's shape
//          and an acceptable dtype; no unknown tensors; for a checkpoint, every optimiser state vector present as F64
//          with the buffer's length. The first problem is thrown, naming the tensor: KeyError (missing or
//          unexpected name), ShapeError (shape), ValueError (dtype). A failed load leaves model and optimiser as
//          they were.
// SAVING   Atomic (io::write_file_atomic): a crash, a kill or a full disk during a save leaves the previous file
//          intact (at worst a stray "<path>.tmp.<pid>" is left behind after a kill).
// PYTORCH  sd = safetensors.torch.load_file(path)
//          model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("optimizer.", "trainer."))})
#pragma once

#include <sma/core/param.hpp>
#include <sma/io/safetensors.hpp>
#include <sma/io/state_dict.hpp>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma::train {

inline constexpr const char* kCheckpointFormat = "sma-checkpoint-v1";

/// True for the names a checkpoint keeps next to the model's tensors.
inline bool is_training_state_name(const std::string& name) {
  return name.rfind("optimizer.", 0) == 0 || name.rfind("trainer.", 0) == 0;
}

struct WeightsLoadOptions {
  /// Require each tensor in the model's own scalar dtype (F32 for a float model). Off: any floating dtype
  /// converts (a PyTorch float32 state_dict loads into a double model, and back).
  bool exact_dtype = false;
  /// Ignore tensors the model does not have (off: they are an error, so a file for another model is caught).
  bool allow_extra = false;
};

/// What a loaded checkpoint said about itself.
struct CheckpointInfo {
  Index step = 0;
  std::map<std::string, std::string> metadata;
  /// metadata[key], or `fallback` when absent.
  std::string get(const std::string& key, const std::string& fallback = "") const {
    auto it = metadata.find(key);
    return it == metadata.end() ? fallback : it->second;
  }
};

namespace detail {

inline bool is_count_buffer(const std::string& name) {
  const std::string tail = "num_batches_tracked";
  return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
}

template <class T>
const char* scalar_dtype_name() {
  return io::to_string(io::dtype_of<T>);
}

/// Throws the first problem with the model tensors of `file` (see the header comment).
template <class Model>
void check_model_tensors(const io::SafetensorsFile& file, Model& model, const WeightsLoadOptions& opt) {
  std::set<std::string> known;
  for_each_param(model, [&](const std::string& name, auto& p) {
    using T = typename std::decay_t<decltype(p)>::Scalar;
    known.insert(name);
    if (!file.contains(name))
      throw KeyError(str_cat(file.path(), ": tensor '", name, "' is missing (the model expects shape ",
                             shape_string(p.shape()), ")"));
    const io::TensorInfo& info = file.info(name);
    if (info.shape != p.shape())
      throw ShapeError(str_cat(file.path(), ": tensor '", name, "' has shape ", shape_string(info.shape),
                               ", the model expects ", shape_string(p.shape())));
    const bool count = is_count_buffer(name);
    if (count && (info.dtype == io::DType::I64 || info.dtype == io::DType::I32)) return;
    if (!io::is_floating(info.dtype))
      throw ValueError(str_cat(file.path(), ": tensor '", name, "' is stored as ", io::to_string(info.dtype),
                               "; a model tensor must be F32, F64, F16 or BF16", count ? " (or I64)" : ""));
    if (opt.exact_dtype && info.dtype != io::dtype_of<T> && !count)
      throw ValueError(str_cat(file.path(), ": tensor '", name, "' is stored as ", io::to_string(info.dtype),
                               " but the model's scalar is ", scalar_dtype_name<T>(),
                               " (resuming needs the exact dtype; load_weights converts)"));
  });
  if (opt.allow_extra) return;
  for (const auto& name : file.names()) {
    if (known.count(name) || is_training_state_name(name)) continue;
    throw KeyError(str_cat(file.path(), ": tensor '", name,
                           "' is not a parameter of this model (a file for another configuration?)"));
  }
}

template <class O, class = void>
struct has_name : std::false_type {};
template <class O>
struct has_name<O, std::void_t<decltype(std::string(std::declval<const O&>().name()))>> : std::true_type {};

/// The optimiser's state vectors: name -> length (a dry visit: nothing is changed).
template <class Opt>
std::map<std::string, std::size_t> optimizer_state_sizes(Opt& opt) {
  std::map<std::string, std::size_t> sizes;
  opt.visit_state([&](const std::string& name, std::vector<double>& v) { sizes[name] = v.size(); });
  return sizes;
}

template <class Opt>
void check_optimizer_tensors(const io::SafetensorsFile& file, Opt& opt) {
  const auto sizes = optimizer_state_sizes(opt);
  for (const auto& kv : sizes) {
    const std::string key = "optimizer." + kv.first;
    if (!file.contains(key))
      throw KeyError(str_cat(file.path(), ": tensor '", key, "' is missing (was the checkpoint written with another "
                             "optimiser, or with save_weights?)"));
    const io::TensorInfo& info = file.info(key);
    const std::vector<Index> want{static_cast<Index>(kv.second)};
    if (info.shape != want)
      throw ShapeError(str_cat(file.path(), ": tensor '", key, "' has shape ", shape_string(info.shape),
                               ", the optimiser expects ", shape_string(want)));
    if (info.dtype != io::DType::F64)
      throw ValueError(str_cat(file.path(), ": tensor '", key, "' is stored as ", io::to_string(info.dtype),
                               "; optimiser state must be F64"));
  }
  for (const auto& name : file.names()) {
    if (name.rfind("optimizer.", 0) != 0) continue;
    if (!sizes.count(name.substr(10)))
      throw KeyError(str_cat(file.path(), ": tensor '", name, "' is not part of this optimiser's state (was the "
                             "checkpoint written with another optimiser?)"));
  }
}

}  // namespace detail

/// Adds every parameter and buffer of `model` to `writer` under its official name (see LAYOUT).
template <class Model>
void add_weights(io::SafetensorsWriter& writer, Model& model) {
  for_each_param(model, [&](const std::string& name, auto& p) {
    if (detail::is_count_buffer(name)) {
      std::vector<std::int64_t> v(static_cast<std::size_t>(p.size()));
      for (Index i = 0; i < p.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(p.data()[i]);
      writer.add(name, v.data(), p.shape());
    } else {
      writer.add(name, p.data(), p.shape());
    }
  });
}

/// Writes the model's weights alone (no training state): a file PyTorch's load_state_dict takes as it is.
template <class Model>
void save_weights(const std::string& path, Model& model, const std::map<std::string, std::string>& metadata = {},
                  const io::AtomicWriteOptions& options = {}) {
  io::SafetensorsWriter w;
  add_weights(w, model);
  for (const auto& kv : metadata) w.set_metadata(kv.first, kv.second);
  w.set_metadata("format", kCheckpointFormat);
  w.set_metadata("kind", "weights");
  w.save(path, options);
}

/// Loads the model's weights from `file` (ours, a checkpoint, or a PyTorch state_dict saved with safetensors),
/// after checking every name, shape and dtype; training state in the file is ignored.
template <class Model>
void load_weights(const io::SafetensorsFile& file, Model& model, const WeightsLoadOptions& opt = {}) {
  detail::check_model_tensors(file, model, opt);
  io::LoadOptions lo;
  lo.allow_extra = opt.allow_extra;
  lo.ignore = is_training_state_name;
  io::load_state_dict(model, file, lo);
}
template <class Model>
void load_weights(const std::string& path, Model& model, const WeightsLoadOptions& opt = {}) {
  load_weights(io::SafetensorsFile(path), model, opt);
}

/// Saves model, optimiser state and step atomically (see LAYOUT). `optimizer` provides visit_state(v) (every
/// optimiser of sma/optim and train::Optimizer do).
template <class Model, class Opt>
void save_checkpoint(const std::string& path, Model& model, Opt& optimizer, Index step,
                     const std::map<std::string, std::string>& metadata = {},
                     const io::AtomicWriteOptions& options = {}) {
  io::SafetensorsWriter w;
  add_weights(w, model);
  optimizer.visit_state([&](const std::string& name, std::vector<double>& v) {
    w.add("optimizer." + name, v.data(), {static_cast<Index>(v.size())});
  });
  const std::int64_t s = static_cast<std::int64_t>(step);
  w.add("trainer.step", &s, std::vector<Index>{});
  for (const auto& kv : metadata) w.set_metadata(kv.first, kv.second);
  w.set_metadata("format", kCheckpointFormat);
  w.set_metadata("kind", "checkpoint");
  if constexpr (detail::has_name<Opt>::value) w.set_metadata("optimizer", optimizer.name());
  w.save(path, options);
}

/// Restores model, optimiser state and step from a checkpoint written by save_checkpoint, so that training resumes
/// exactly. Validates everything first (model tensors in the model's exact dtype, optimiser state, step); on any
/// problem it throws and changes nothing.
template <class Model, class Opt>
CheckpointInfo load_checkpoint(const io::SafetensorsFile& file, Model& model, Opt& optimizer) {
  if (!file.contains("trainer.step"))
    throw KeyError(str_cat(file.path(), ": tensor 'trainer.step' is missing (a weights-only file? use load_weights)"));
  const io::TensorInfo& si = file.info("trainer.step");
  if (!si.shape.empty() || si.dtype != io::DType::I64)
    throw ValueError(str_cat(file.path(), ": tensor 'trainer.step' must be an I64 scalar, got ", io::to_string(si.dtype),
                             " of shape ", shape_string(si.shape)));
  WeightsLoadOptions wo;
  wo.exact_dtype = true;
  detail::check_model_tensors(file, model, wo);
  detail::check_optimizer_tensors(file, optimizer);
  if constexpr (detail::has_name<Opt>::value) {
    if (file.has_metadata("optimizer") && file.metadata_value("optimizer") != optimizer.name())
      throw ValueError(str_cat(file.path(), ": written by optimiser '", file.metadata_value("optimizer"),
                               "', resumed with '", optimizer.name(), "'"));
  }

  io::LoadOptions lo;
  lo.ignore = is_training_state_name;
  io::load_state_dict(model, file, lo);
  optimizer.visit_state([&](const std::string& name, std::vector<double>& v) {
    const std::vector<double> stored = file.values<double>("optimizer." + name);
    std::copy(stored.begin(), stored.end(), v.begin());
  });
  CheckpointInfo info;
  info.step = static_cast<Index>(file.values<std::int64_t>("trainer.step").at(0));
  info.metadata = file.metadata();
  return info;
}
template <class Model, class Opt>
CheckpointInfo load_checkpoint(const std::string& path, Model& model, Opt& optimizer) {
  return load_checkpoint(io::SafetensorsFile(path), model, optimizer);
}

}  // namespace sma::train
