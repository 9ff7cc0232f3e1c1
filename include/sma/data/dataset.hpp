// sma/data/dataset.hpp: the one in-memory form of every classification data set, batches, epochs and splits.
//
// A data set is a list of examples, each a sequence with one label. Token data (ListOps, bytes) keeps one integer
// id per position and is batched as a (B, L) int32 tensor that a model embeds; real-valued data (pixels) keeps
// `feature_dim` floats per position and is batched as (B, L, feature_dim). Sequences longer than the batch length
// are truncated (their head is kept), shorter ones are padded, and the (B, L) padding mask marks padded positions
// with 1 (the convention of Context::padding). Every random choice here (epoch order, splits) is a function of an
// explicit seed and gives the same result with every standard library (see Rng). See docs/data.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace sma::data {

// ---------------------------------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------------------------------

/// Seeded random numbers that are the same on every platform.
///
/// std::mt19937_64 is specified bit for bit by the standard, but std::uniform_int_distribution and std::shuffle are
/// not (libstdc++ and libc++ differ), so the few draws the data code needs are written here on the raw engine.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}

  /// 64 random bits.
  std::uint64_t bits() { return engine_(); }
  /// Uniform in [0, 1), from 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * (1.0 / 9007199254740992.0); }
  /// Uniform integer in [0, n), without modulo bias. REQUIRES n >= 1.
  std::uint64_t below(std::uint64_t n) {
    if (n == 0) throw ValueError("data::Rng::below: n must be at least 1");
    const std::uint64_t threshold = (0 - n) % n;  // 2^64 mod n: draws under it would favour small values
    std::uint64_t r = engine_();
    while (r < threshold) r = engine_();
    return r % n;
  }
  /// Uniform integer in [lo, hi], both ends included. REQUIRES lo <= hi.
  std::int64_t between(std::int64_t lo, std::int64_t hi) {
    if (hi < lo) throw ValueError(str_cat("data::Rng::between: empty range [", lo, ", ", hi, "]"));
    return lo + static_cast<std::int64_t>(below(static_cast<std::uint64_t>(hi - lo) + 1));
  }
  /// Fisher-Yates shuffle of a random-access container.
  template <class Container>
  void shuffle(Container& c) {
    for (std::size_t i = c.size(); i > 1; --i) {
      const std::size_t j = static_cast<std::size_t>(below(i));
      std::swap(c[i - 1], c[j]);
    }
  }

 private:
  std::mt19937_64 engine_;
};

/// A seed for stream `stream` of `seed` (splitmix64 of both), so that e.g. epoch k's order depends only on
/// (seed, k) and a run resumed at epoch k sees the order it would have seen.
inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t stream) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/// A random permutation of 0 .. n-1, a function of `seed` only.
inline std::vector<Index> permutation(Index n, std::uint64_t seed) {
  if (n < 0) throw ValueError(str_cat("data::permutation: n = ", n, " is negative"));
  std::vector<Index> p(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = i;
  Rng rng(seed);
  rng.shuffle(p);
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// Examples and data sets
// ---------------------------------------------------------------------------------------------------------------

/// Which part of a data set.
enum class Split : std::uint8_t { train, valid, test };
inline const char* to_string(Split s) { return s == Split::train ? "train" : s == Split::valid ? "valid" : "test"; }

/// One sequence and its label. Token data fills `tokens` (one id per position); real-valued data fills `values`
/// (length * feature_dim floats, position-major: values[t * feature_dim + f]). The other vector stays empty.
struct Example {
  std::vector<std::int32_t> tokens;
  std::vector<float> values;
  std::int64_t label = 0;
};

/// A classification data set.
///
/// INVARIANTS (checked by validate()):
/// - token data: vocab_size > 0, every token in [0, vocab_size), `pad_token` in [0, vocab_size), values empty;
/// - real-valued data: vocab_size == 0, feature_dim >= 1, values.size() a multiple of feature_dim, tokens empty;
/// - every label in [0, num_classes); class_names empty or of size num_classes.
struct Dataset {
  std::string name;
  std::vector<Example> examples;
  Index vocab_size = 0;        ///< token ids are in [0, vocab_size); 0 for real-valued data
  std::int32_t pad_token = 0;  ///< the id written at padded positions of token batches
  Index feature_dim = 1;       ///< floats per position of real-valued data (1 for token data: one id)
  Index num_classes = 0;
  std::vector<std::string> class_names;  ///< optional, one per class

  bool has_tokens() const { return vocab_size > 0; }
  Index size() const { return static_cast<Index>(examples.size()); }
  /// Positions in example i.
  Index length(Index i) const {
    const Example& e = examples.at(static_cast<std::size_t>(i));
    return has_tokens() ? static_cast<Index>(e.tokens.size()) : static_cast<Index>(e.values.size()) / feature_dim;
  }
  /// The longest example's length (0 for an empty data set).
  Index max_length() const {
    Index m = 0;
    for (Index i = 0; i < size(); ++i) m = std::max(m, length(i));
    return m;
  }
  /// Throws ValueError naming the first example (and position) that breaks an invariant above.
  void validate() const;
};

/// How many examples of each class (a vector of num_classes counts).
inline std::vector<Index> class_counts(const Dataset& ds);

/// A data set of the examples at `indices` (in that order), with every other field copied; `name` defaults to
/// ds.name. Throws ValueError for an index outside [0, ds.size()).
inline Dataset subset(const Dataset& ds, const std::vector<Index>& indices, const std::string& name = "");

// ---------------------------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------------------------

/// Length of the batch's sequence axis: always `max_len`, or the longest example of the batch (capped at max_len).
enum class PadTo : std::uint8_t { max_len, longest };

/// A batch of B examples of length L.
///
/// SHAPES: token data: tokens (B, L) int32 with pad_token at padded positions, values empty (0, 0, 0);
///         real-valued data: values (B, L, feature_dim) with 0 at padded positions, tokens empty (0, 0);
///         padding (B, L), 1 = padded position; labels, lengths, indices: B each.
template <class T>
struct Batch {
  Tensor2<std::int32_t> tokens;
  Tensor3<T> values;
  Mask padding;
  std::vector<std::int64_t> labels;
  std::vector<Index> lengths;  ///< real (kept) positions per row: min(example length, L)
  std::vector<Index> indices;  ///< the rows of the data set, in batch order

  Index size() const { return padding.dimension(0); }
  Index length() const { return padding.dimension(1); }
  /// True when some row is shorter than L (a model may skip masking otherwise).
  bool has_padding() const {
    for (Index n : lengths)
      if (n < length()) return true;
    return false;
  }
};

/// Gathers the examples at `indices` into a batch: each is truncated to its first `max_len` positions or padded
/// at the end. Throws ValueError for an empty `indices`, an index out of range, max_len < 1, or a token outside
/// [0, vocab_size) (so an embedding lookup downstream can never read out of bounds).
template <class T>
Batch<T> make_batch(const Dataset& ds, const std::vector<Index>& indices, Index max_len, PadTo pad_to = PadTo::max_len);

// ---------------------------------------------------------------------------------------------------------------
// Epochs and splits
// ---------------------------------------------------------------------------------------------------------------

/// Batches of row indices over epochs, in an order that is a function of (seed, epoch) only.
///
///   EpochIterator it(ds.size(), 32, seed);
///   for (std::uint64_t epoch = 0; epoch < n_epochs; ++epoch) {
///     it.start_epoch(epoch);
///     std::vector<Index> rows;
///     while (it.next(rows)) { auto batch = make_batch<float>(ds, rows, 1024); ... }
///   }
///
/// With shuffle off the order is 0 .. n-1. The last batch of an epoch is smaller unless drop_last is set (then it
/// is left out). The constructor starts epoch 0.
class EpochIterator {
 public:
  EpochIterator(Index num_examples, Index batch_size, std::uint64_t seed, bool shuffle = true, bool drop_last = false)
      : n_(num_examples), batch_(batch_size), seed_(seed), shuffle_(shuffle), drop_last_(drop_last) {
    if (num_examples < 0) throw ValueError(str_cat("EpochIterator: num_examples = ", num_examples, " is negative"));
    if (batch_size < 1) throw ValueError(str_cat("EpochIterator: batch_size = ", batch_size, " must be at least 1"));
    start_epoch(0);
  }

  /// Starts epoch `epoch` (any number: epochs need not be visited in order).
  void start_epoch(std::uint64_t epoch) {
    epoch_ = epoch;
    pos_ = 0;
    if (shuffle_) {
      order_ = permutation(n_, mix_seed(seed_, epoch));
    } else {
      order_.resize(static_cast<std::size_t>(n_));
      for (Index i = 0; i < n_; ++i) order_[static_cast<std::size_t>(i)] = i;
    }
  }
  /// Writes the next batch's rows into `rows` and returns true, or returns false at the end of the epoch.
  bool next(std::vector<Index>& rows) {
    const Index left = n_ - pos_;
    if (left <= 0 || (drop_last_ && left < batch_)) return false;
    const Index take = std::min(left, batch_);
    rows.assign(order_.begin() + pos_, order_.begin() + pos_ + take);
    pos_ += take;
    return true;
  }
  Index batches_per_epoch() const { return drop_last_ ? n_ / batch_ : (n_ + batch_ - 1) / batch_; }
  std::uint64_t epoch() const { return epoch_; }
  /// This epoch's full order.
  const std::vector<Index>& order() const { return order_; }

 private:
  Index n_, batch_;
  std::uint64_t seed_;
  bool shuffle_, drop_last_;
  std::uint64_t epoch_ = 0;
  Index pos_ = 0;
  std::vector<Index> order_;
};

/// Row indices of a train/valid/test split, each list ascending.
struct SplitIndices {
  std::vector<Index> train, valid, test;
};

/// Three data sets made from one.
struct Splits {
  Dataset train, valid, test;
};

/// A seeded random split: round(n * valid_fraction) rows go to valid, round(n * test_fraction) to test, the rest to
/// train. With `stratify` the rounding is done per class, so each part keeps the class proportions. Throws
/// ValueError unless both fractions are in [0, 1] and sum to at most 1.
inline SplitIndices split_indices(const Dataset& ds, double valid_fraction, double test_fraction, std::uint64_t seed,
                                  bool stratify = true);

/// split_indices applied: the parts are named "<name>/train", "<name>/valid", "<name>/test". Pass the data set
/// with std::move to avoid holding two copies of its examples.
inline Splits split(Dataset ds, double valid_fraction, double test_fraction, std::uint64_t seed, bool stratify = true);

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

/// The value of an environment variable, or "" when it is unset.
inline std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

/// The first directory among `candidates` that holds the file `probe` (relative to it), or nothing.
inline std::optional<std::string> first_dir_with(const std::vector<std::string>& candidates, const std::string& probe) {
  std::error_code ec;
  for (const std::string& dir : candidates) {
    if (dir.empty()) continue;
    if (std::filesystem::exists(std::filesystem::path(dir) / probe, ec)) return dir;
  }
  return std::nullopt;
}

/// Directories where `npm install` may have put `package` (a scoped name like "@stdlib/x" works): the project's
/// own prefix /opt/sma-npm, the current directory, the home directory, the global prefixes.
inline std::vector<std::string> npm_package_dirs(const std::string& package) {
  std::vector<std::string> roots = {"/opt/sma-npm/node_modules", "node_modules", "/usr/local/lib/node_modules",
                                    "/usr/lib/node_modules", "/usr/share/nodejs"};
  const std::string home = env_or_empty("HOME");
  if (!home.empty()) roots.insert(roots.begin() + 2, home + "/node_modules");
  for (std::string& r : roots) r += "/" + package;
  return roots;
}

}  // namespace detail

inline void Dataset::validate() const {
  const std::string where = str_cat("Dataset '", name, "'");
  if (num_classes < 1) throw ValueError(str_cat(where, ": num_classes = ", num_classes, " must be at least 1"));
  if (!class_names.empty() && static_cast<Index>(class_names.size()) != num_classes)
    throw ValueError(str_cat(where, ": ", class_names.size(), " class names for ", num_classes, " classes"));
  if (vocab_size < 0) throw ValueError(str_cat(where, ": vocab_size = ", vocab_size, " is negative"));
  if (has_tokens() && (pad_token < 0 || pad_token >= vocab_size))
    throw ValueError(str_cat(where, ": pad_token ", pad_token, " is outside [0, ", vocab_size, ")"));
  if (!has_tokens() && feature_dim < 1)
    throw ValueError(str_cat(where, ": feature_dim = ", feature_dim, " must be at least 1"));
  for (std::size_t i = 0; i < examples.size(); ++i) {
    const Example& e = examples[i];
    if (e.label < 0 || e.label >= num_classes)
      throw ValueError(str_cat(where, ": example ", i, " has label ", e.label, ", outside [0, ", num_classes, ")"));
    if (has_tokens()) {
      if (!e.values.empty()) throw ValueError(str_cat(where, ": token example ", i, " also has values"));
      for (std::size_t t = 0; t < e.tokens.size(); ++t)
        if (e.tokens[t] < 0 || e.tokens[t] >= vocab_size)
          throw ValueError(str_cat(where, ": example ", i, " position ", t, ": token ", e.tokens[t], " is outside [0, ",
                                   vocab_size, ")"));
    } else {
      if (!e.tokens.empty()) throw ValueError(str_cat(where, ": real-valued example ", i, " has tokens"));
      if (static_cast<Index>(e.values.size()) % feature_dim != 0)
        throw ValueError(str_cat(where, ": example ", i, " has ", e.values.size(),
                                 " values, not a multiple of feature_dim ", feature_dim));
    }
  }
}

inline std::vector<Index> class_counts(const Dataset& ds) {
  std::vector<Index> counts(static_cast<std::size_t>(std::max<Index>(ds.num_classes, 0)), 0);
  for (const Example& e : ds.examples) {
    if (e.label < 0 || e.label >= ds.num_classes)
      throw ValueError(str_cat("class_counts: label ", e.label, " is outside [0, ", ds.num_classes, ")"));
    ++counts[static_cast<std::size_t>(e.label)];
  }
  return counts;
}

inline Dataset subset(const Dataset& ds, const std::vector<Index>& indices, const std::string& name) {
  Dataset out;
  out.name = name.empty() ? ds.name : name;
  out.vocab_size = ds.vocab_size;
  out.pad_token = ds.pad_token;
  out.feature_dim = ds.feature_dim;
  out.num_classes = ds.num_classes;
  out.class_names = ds.class_names;
  out.examples.reserve(indices.size());
  for (Index i : indices) {
    if (i < 0 || i >= ds.size())
      throw ValueError(str_cat("subset of '", ds.name, "': index ", i, " is outside [0, ", ds.size(), ")"));
    out.examples.push_back(ds.examples[static_cast<std::size_t>(i)]);
  }
  return out;
}

template <class T>
Batch<T> make_batch(const Dataset& ds, const std::vector<Index>& indices, Index max_len, PadTo pad_to) {
  const std::string where = str_cat("make_batch('", ds.name, "')");
  if (indices.empty()) throw ValueError(where + ": no indices");
  if (max_len < 1) throw ValueError(str_cat(where, ": max_len = ", max_len, " must be at least 1"));
  const Index B = static_cast<Index>(indices.size());
  Index L = max_len;
  if (pad_to == PadTo::longest) {
    L = 1;
    for (Index i : indices) {
      if (i < 0 || i >= ds.size()) break;  // reported below
      L = std::max(L, std::min(max_len, ds.length(i)));
    }
  }
  Batch<T> b;
  b.padding = Mask(B, L);
  b.padding.setConstant(1);
  b.labels.resize(static_cast<std::size_t>(B));
  b.lengths.resize(static_cast<std::size_t>(B));
  b.indices = indices;
  const bool tok = ds.has_tokens();
  const Index D = ds.feature_dim;
  if (tok) {
    b.tokens = Tensor2<std::int32_t>(B, L);
    b.tokens.setConstant(ds.pad_token);
    b.values = Tensor3<T>(0, 0, 0);
  } else {
    if (D < 1) throw ValueError(str_cat(where, ": feature_dim = ", D, " must be at least 1"));
    b.tokens = Tensor2<std::int32_t>(0, 0);
    b.values = zeros<T, 3>({B, L, D});
  }
  for (Index r = 0; r < B; ++r) {
    const Index i = indices[static_cast<std::size_t>(r)];
    if (i < 0 || i >= ds.size())
      throw ValueError(str_cat(where, ": index ", i, " (batch row ", r, ") is outside [0, ", ds.size(), ")"));
    const Example& e = ds.examples[static_cast<std::size_t>(i)];
    const Index n = std::min(L, ds.length(i));
    b.labels[static_cast<std::size_t>(r)] = e.label;
    b.lengths[static_cast<std::size_t>(r)] = n;
    for (Index t = 0; t < n; ++t) b.padding(r, t) = 0;
    if (tok) {
      for (Index t = 0; t < n; ++t) {
        const std::int32_t id = e.tokens[static_cast<std::size_t>(t)];
        if (id < 0 || id >= ds.vocab_size)
          throw ValueError(
              str_cat(where, ": example ", i, " position ", t, ": token ", id, " is outside [0, ", ds.vocab_size, ")"));
        b.tokens(r, t) = id;
      }
    } else {
      T* dst = b.values.data() + r * L * D;
      const float* src = e.values.data();
      for (Index k = 0; k < n * D; ++k) dst[k] = static_cast<T>(src[k]);
    }
  }
  return b;
}

inline SplitIndices split_indices(const Dataset& ds, double valid_fraction, double test_fraction, std::uint64_t seed,
                                  bool stratify) {
  if (!(valid_fraction >= 0 && valid_fraction <= 1 && test_fraction >= 0 && test_fraction <= 1 &&
        valid_fraction + test_fraction <= 1 + 1e-12))
    throw ValueError(str_cat("split_indices('", ds.name, "'): fractions valid ", valid_fraction, " and test ",
                             test_fraction, " must be in [0, 1] and sum to at most 1"));
  // Groups of rows split independently: one per class, or one for all.
  std::vector<std::vector<Index>> groups(stratify ? static_cast<std::size_t>(std::max<Index>(ds.num_classes, 1)) : 1);
  for (Index i = 0; i < ds.size(); ++i) {
    std::size_t g = 0;
    if (stratify) {
      const std::int64_t y = ds.examples[static_cast<std::size_t>(i)].label;
      if (y < 0 || y >= ds.num_classes)
        throw ValueError(str_cat("split_indices('", ds.name, "'): example ", i, " has label ", y, ", outside [0, ",
                                 ds.num_classes, ")"));
      g = static_cast<std::size_t>(y);
    }
    groups[g].push_back(i);
  }
  SplitIndices s;
  Rng rng(mix_seed(seed, 0x5b117));
  for (auto& rows : groups) {
    rng.shuffle(rows);
    const Index n = static_cast<Index>(rows.size());
    const Index nv = std::min(n, static_cast<Index>(std::llround(static_cast<double>(n) * valid_fraction)));
    const Index nt = std::min(n - nv, static_cast<Index>(std::llround(static_cast<double>(n) * test_fraction)));
    s.valid.insert(s.valid.end(), rows.begin(), rows.begin() + nv);
    s.test.insert(s.test.end(), rows.begin() + nv, rows.begin() + nv + nt);
    s.train.insert(s.train.end(), rows.begin() + nv + nt, rows.end());
  }
  std::sort(s.train.begin(), s.train.end());
  std::sort(s.valid.begin(), s.valid.end());
  std::sort(s.test.begin(), s.test.end());
  return s;
}

inline Splits split(Dataset ds, double valid_fraction, double test_fraction, std::uint64_t seed, bool stratify) {
  const SplitIndices idx = split_indices(ds, valid_fraction, test_fraction, seed, stratify);
  Splits out;
  auto take = [&](const std::vector<Index>& rows, const char* part) {
    Dataset d;
    d.name = ds.name + "/" + part;
    d.vocab_size = ds.vocab_size;
    d.pad_token = ds.pad_token;
    d.feature_dim = ds.feature_dim;
    d.num_classes = ds.num_classes;
    d.class_names = ds.class_names;
    d.examples.reserve(rows.size());
    for (Index i : rows) d.examples.push_back(std::move(ds.examples[static_cast<std::size_t>(i)]));
    return d;
  };
  out.train = take(idx.train, "train");
  out.valid = take(idx.valid, "valid");
  out.test = take(idx.test, "test");
  return out;
}

}  // namespace sma::data
