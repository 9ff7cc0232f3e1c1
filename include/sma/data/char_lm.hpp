// sma/data/char_lm.hpp: character-level language modelling on one long text: vocabulary, contiguous splits,
// random-window training batches, sequential evaluation batches and bits per character.
//
// A text is a byte string; its vocabulary is the set of distinct bytes in ascending byte order (so the ids depend
// only on the text). The text is cut into train, valid and test parts in that order, without shuffling (the usual
// setup of enwik8/text8: nearby characters never end up on both sides). A batch row is a window of L characters
// and its targets are the same window shifted by one: targets(b, t) = text[o_b + t + 1] for inputs(b, t) =
// text[o_b + t]. See docs/data.md.
#pragma once

#include <sma/data/dataset.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace sma::data {

/// The characters (bytes) of a text and their ids 0 .. size()-1, in ascending byte order.
class CharVocab {
 public:
  CharVocab() { ids_.fill(-1); }
  /// The vocabulary of the distinct bytes of `text`.
  static CharVocab from_text(const std::string& text) {
    std::array<bool, 256> seen{};
    for (unsigned char c : text) seen[c] = true;
    CharVocab v;
    for (int c = 0; c < 256; ++c)
      if (seen[static_cast<std::size_t>(c)]) {
        v.ids_[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(v.symbols_.size());
        v.symbols_.push_back(static_cast<char>(c));
      }
    return v;
  }
  Index size() const { return static_cast<Index>(symbols_.size()); }
  /// The characters in id order.
  const std::string& symbols() const { return symbols_; }
  bool contains(unsigned char c) const { return ids_[c] >= 0; }
  /// The id of `c`; ValueError when it is not in the vocabulary.
  std::int32_t id(unsigned char c) const {
    if (ids_[c] < 0) throw ValueError(str_cat("CharVocab: byte ", int(c), " is not in the vocabulary"));
    return ids_[c];
  }
  /// The character of id `i`; ValueError outside [0, size()).
  char symbol(std::int32_t i) const {
    if (i < 0 || i >= size()) throw ValueError(str_cat("CharVocab: id ", i, " is outside [0, ", size(), ")"));
    return symbols_[static_cast<std::size_t>(i)];
  }
  std::vector<std::int32_t> encode(const std::string& text) const {
    std::vector<std::int32_t> out(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) out[i] = id(static_cast<unsigned char>(text[i]));
    return out;
  }
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string s(ids.size(), '\0');
    for (std::size_t i = 0; i < ids.size(); ++i) s[i] = symbol(ids[i]);
    return s;
  }

 private:
  std::string symbols_;
  std::array<std::int32_t, 256> ids_;
};

/// A text encoded with its vocabulary and cut into contiguous parts.
struct CharCorpus {
  std::string name;
  CharVocab vocab;
  std::vector<std::int32_t> train, valid, test;
  const std::vector<std::int32_t>& part(Split s) const {
    return s == Split::train ? train : s == Split::valid ? valid : test;
  }
};

/// Encodes `text` with its own vocabulary (built from the whole text, so valid/test characters always have ids)
/// and cuts it: the first n - round(n * valid_fraction) - round(n * test_fraction) characters are train, then
/// valid, then test. ValueError unless the fractions are in [0, 1) and leave a non-empty train part.
inline CharCorpus make_char_corpus(const std::string& text, double valid_fraction = 0.05, double test_fraction = 0.05,
                                   const std::string& name = "text");

/// Inputs and next-character targets.
///
/// SHAPES: inputs (B, L) int32 ids; targets (B, L) int64 ids, or -100 (optim::cross_entropy's default `ignore`)
/// at padded positions; padding (B, L), 1 = padded (only the last batch of LmSequentialBatcher has any).
struct LmBatch {
  Tensor2<std::int32_t> inputs;
  Tensor2<std::int64_t> targets;
  Mask padding;
  Index size() const { return inputs.dimension(0); }
  Index length() const { return inputs.dimension(1); }
  /// The targets row-major as one vector, matching logits viewed as (B * L, V) for optim::cross_entropy.
  std::vector<std::int64_t> flat_targets() const {
    return std::vector<std::int64_t>(targets.data(), targets.data() + targets.size());
  }
  /// Positions with a target (not ignored).
  Index num_targets() const {
    Index n = 0;
    for (Index i = 0; i < targets.size(); ++i) n += targets.data()[i] >= 0;
    return n;
  }
};

/// Training batches of windows at uniformly random offsets o in [0, n - L - 1] (every window and its shifted
/// targets lie inside the stream), drawn from `seed`: the k-th batch is the same in every run.
/// The batcher keeps a pointer to `stream`, which must outlive it.
class LmBatcher {
 public:
  LmBatcher(const std::vector<std::int32_t>& stream, Index batch_size, Index seq_len, std::uint64_t seed)
      : stream_(&stream), batch_(batch_size), len_(seq_len), rng_(seed) {
    if (batch_size < 1 || seq_len < 1)
      throw ValueError(str_cat("LmBatcher: batch_size ", batch_size, " and seq_len ", seq_len, " must be positive"));
    if (static_cast<Index>(stream.size()) < seq_len + 1)
      throw ValueError(str_cat("LmBatcher: a stream of ", stream.size(), " characters is too short for windows of ",
                               seq_len, " plus one target"));
  }
  LmBatch next() {
    LmBatch b;
    b.inputs = Tensor2<std::int32_t>(batch_, len_);
    b.targets = Tensor2<std::int64_t>(batch_, len_);
    b.padding = Mask(batch_, len_);
    b.padding.setZero();
    const std::uint64_t offsets = static_cast<std::uint64_t>(stream_->size()) - static_cast<std::uint64_t>(len_);
    for (Index r = 0; r < batch_; ++r) {
      const std::int32_t* s = stream_->data() + rng_.below(offsets);
      for (Index t = 0; t < len_; ++t) {
        b.inputs(r, t) = s[t];
        b.targets(r, t) = s[t + 1];
      }
    }
    return b;
  }
  Index batch_size() const { return batch_; }
  Index seq_len() const { return len_; }

 private:
  const std::vector<std::int32_t>* stream_;
  Index batch_, len_;
  Rng rng_;
};

/// Evaluation batches that predict every character of the stream after the first exactly once: window w covers
/// inputs [w L, w L + L) and targets one further; the last window is padded (targets -100, padding 1). Batches
/// hold batch_size consecutive windows, the last one fewer. Keeps a pointer to `stream`, which must outlive it.
class LmSequentialBatcher {
 public:
  LmSequentialBatcher(const std::vector<std::int32_t>& stream, Index batch_size, Index seq_len)
      : stream_(&stream), batch_(batch_size), len_(seq_len) {
    if (batch_size < 1 || seq_len < 1)
      throw ValueError(
          str_cat("LmSequentialBatcher: batch_size ", batch_size, " and seq_len ", seq_len, " must be positive"));
    const Index predicted = std::max<Index>(static_cast<Index>(stream.size()) - 1, 0);
    windows_ = (predicted + len_ - 1) / len_;
  }
  Index num_windows() const { return windows_; }
  Index num_batches() const { return (windows_ + batch_ - 1) / batch_; }
  /// Starts again from the first window.
  void reset() { next_window_ = 0; }
  /// Writes the next batch into `b` and returns true, or returns false after the last one.
  bool next(LmBatch& b) {
    if (next_window_ >= windows_) return false;
    const Index B = std::min(batch_, windows_ - next_window_);
    const Index n = static_cast<Index>(stream_->size());
    b.inputs = Tensor2<std::int32_t>(B, len_);
    b.targets = Tensor2<std::int64_t>(B, len_);
    b.padding = Mask(B, len_);
    for (Index r = 0; r < B; ++r) {
      const Index o = (next_window_ + r) * len_;
      for (Index t = 0; t < len_; ++t) {
        const bool real = o + t + 1 < n;
        b.inputs(r, t) = real ? (*stream_)[static_cast<std::size_t>(o + t)] : 0;
        b.targets(r, t) = real ? (*stream_)[static_cast<std::size_t>(o + t + 1)] : -100;
        b.padding(r, t) = real ? 0 : 1;
      }
    }
    next_window_ += B;
    return true;
  }

 private:
  const std::vector<std::int32_t>* stream_;
  Index batch_, len_, windows_ = 0, next_window_ = 0;
};

/// Bits per character from a mean negative log-likelihood in nats per character: nats / ln 2.
inline double bits_per_char(double nats_per_char) { return nats_per_char / std::log(2.0); }

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

inline CharCorpus make_char_corpus(const std::string& text, double valid_fraction, double test_fraction,
                                   const std::string& name) {
  if (!(valid_fraction >= 0 && valid_fraction < 1 && test_fraction >= 0 && test_fraction < 1))
    throw ValueError(str_cat("make_char_corpus: fractions valid ", valid_fraction, " and test ", test_fraction,
                             " must be in [0, 1)"));
  const Index n = static_cast<Index>(text.size());
  const Index nv = static_cast<Index>(std::llround(static_cast<double>(n) * valid_fraction));
  const Index nt = static_cast<Index>(std::llround(static_cast<double>(n) * test_fraction));
  if (n - nv - nt < 1)
    throw ValueError(str_cat("make_char_corpus: a text of ", n, " characters leaves no training part with valid ",
                             valid_fraction, " and test ", test_fraction));
  CharCorpus c;
  c.name = name;
  c.vocab = CharVocab::from_text(text);
  const std::vector<std::int32_t> all = c.vocab.encode(text);
  const Index ntr = n - nv - nt;
  c.train.assign(all.begin(), all.begin() + ntr);
  c.valid.assign(all.begin() + ntr, all.begin() + ntr + nv);
  c.test.assign(all.begin() + ntr + nv, all.end());
  return c;
}

}  // namespace sma::data
