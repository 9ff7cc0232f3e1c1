// sma/train/batches.hpp: the training batch of step k, as a pure function of (data, seed, k).
//
// A resumed run must see exactly the batches the uninterrupted run would have seen from its step on. Rather than
// saving iterator state, every batch is computed from the step number: classification data go through epochs in
// the EpochIterator's order for (seed, epoch) (a function of those two only), character streams draw their windows
// from a generator seeded by (seed, step).
#pragma once

#include <sma/data/char_lm.hpp>
#include <sma/data/dataset.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sma::train {

/// Batches of `batch_size` rows over shuffled epochs of a data set (the last incomplete batch of an epoch is
/// dropped, so every step has the same size and step k always means epoch k / batches_per_epoch()).
template <class T>
class EpochBatches {
 public:
  EpochBatches(const data::Dataset& ds, Index batch_size, std::uint64_t seed, Index max_len,
               data::PadTo pad_to = data::PadTo::max_len)
      : ds_(&ds), it_(ds.size(), batch_size, seed, /*shuffle=*/true, /*drop_last=*/true), batch_(batch_size),
        max_len_(max_len), pad_to_(pad_to) {
    if (it_.batches_per_epoch() < 1)
      throw ValueError(str_cat("EpochBatches: ", ds.size(), " examples do not fill one batch of ", batch_size));
  }

  Index batches_per_epoch() const { return it_.batches_per_epoch(); }
  std::uint64_t epoch_of(Index step) const { return static_cast<std::uint64_t>(step / batches_per_epoch()); }

  /// The rows of step `step`.
  std::vector<Index> rows(Index step) {
    const std::uint64_t epoch = epoch_of(step);
    if (!have_epoch_ || epoch != it_.epoch()) {
      it_.start_epoch(epoch);
      have_epoch_ = true;
    }
    const Index k = step % batches_per_epoch();
    const auto& order = it_.order();
    return std::vector<Index>(order.begin() + k * batch_, order.begin() + (k + 1) * batch_);
  }

  data::Batch<T> operator()(Index step) { return data::make_batch<T>(*ds_, rows(step), max_len_, pad_to_); }

 private:
  const data::Dataset* ds_;
  data::EpochIterator it_;
  Index batch_, max_len_;
  data::PadTo pad_to_;
  bool have_epoch_ = false;
};

/// Windows of a character stream at random offsets, drawn for step k from mix_seed(seed, k).
class StreamBatches {
 public:
  StreamBatches(const std::vector<std::int32_t>& stream, Index batch_size, Index seq_len, std::uint64_t seed)
      : stream_(&stream), batch_(batch_size), len_(seq_len), seed_(seed) {}
  data::LmBatch operator()(Index step) const {
    data::LmBatcher b(*stream_, batch_, len_, data::mix_seed(seed_, static_cast<std::uint64_t>(step)));
    return b.next();
  }

 private:
  const std::vector<std::int32_t>* stream_;
  Index batch_, len_;
  std::uint64_t seed_;
};

/// Consecutive evaluation batches over a whole data set (no shuffling), in row order.
template <class T>
class SequentialBatches {
 public:
  SequentialBatches(const data::Dataset& ds, Index batch_size, Index max_len, data::PadTo pad_to = data::PadTo::max_len,
                    Index limit = -1)
      : ds_(&ds), batch_(batch_size), max_len_(max_len), pad_to_(pad_to),
        n_(limit >= 0 ? std::min(limit, ds.size()) : ds.size()) {}
  /// Writes the next batch into `b`; false after the last.
  bool operator()(data::Batch<T>& b) {
    if (next_ >= n_) return false;
    std::vector<Index> rows;
    for (Index i = next_; i < std::min(n_, next_ + batch_); ++i) rows.push_back(i);
    next_ += static_cast<Index>(rows.size());
    b = data::make_batch<T>(*ds_, rows, max_len_, pad_to_);
    return true;
  }
  Index size() const { return n_; }

 private:
  const data::Dataset* ds_;
  Index batch_, max_len_;
  data::PadTo pad_to_;
  Index n_, next_ = 0;
};

}  // namespace sma::train
