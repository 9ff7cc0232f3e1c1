// sma/data/kjv.hpp: the King James Bible as one text for character-level language modelling.
//
// SOURCE: Debian packages `bible-kjv` (the `bible` program, GPL-2+) and `bible-kjv-text` (its data, the KJV text,
// public domain). The text ships only in the program's own compressed format (/usr/lib/bible.data), so it is read
// by running `bible -f Gen1:1-Rev22:21`, which prints one verse per line as "<Book><chapter>:<verse> <text>"
// (e.g. "Ge1:1 In the beginning God created the heaven and the earth."). load_kjv_text keeps the verse texts,
// one per line (31102 lines, 4137850 bytes, 63 distinct characters: letters, space, newline and punctuation, no
// digits), or the whole lines with `references`. A plain-text file can be given instead (text_file, or
// $SMA_KJV_TEXT). See docs/data.md.
#pragma once

#include <sma/data/char_lm.hpp>
#include <sma/data/dataset.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <sys/wait.h>

namespace sma::data {

struct KjvOptions {
  /// A plain-text file to use as is instead of running the program ("" = $SMA_KJV_TEXT, else run the program).
  std::string text_file;
  /// The bible-kjv program.
  std::string program = "bible";
  /// Keep each verse's reference ("Ge1:1 ") at the start of its line.
  bool references = false;
};

/// The number of verses the full text has (one line each).
inline constexpr Index kKjvVerses = 31102;

/// True when the text can be loaded with default options: $SMA_KJV_TEXT names a file, or the bible program and its
/// data file /usr/lib/bible.data exist.
inline bool kjv_available();

/// The text, verses one per line, each ending in '\n'. Throws IoError when the program cannot be run, fails, or
/// prints something other than 31102 verse lines starting at Genesis 1:1 (the message says which and how to
/// install the packages), or when text_file cannot be read.
inline std::string load_kjv_text(const KjvOptions& options = {});

/// load_kjv_text cut by make_char_corpus (contiguous 90/5/5 by default), named "kjv".
inline CharCorpus load_kjv_corpus(const KjvOptions& options = {}, double valid_fraction = 0.05,
                                  double test_fraction = 0.05) {
  return make_char_corpus(load_kjv_text(options), valid_fraction, test_fraction, "kjv");
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(str_cat(path, ": cannot open for reading"));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw IoError(str_cat(path, ": read error"));
  return s;
}

/// The program on PATH (or the path itself when it has a '/'), or "".
inline std::string find_program(const std::string& program) {
  std::error_code ec;
  if (program.find('/') != std::string::npos) return std::filesystem::exists(program, ec) ? program : std::string();
  std::string path = env_or_empty("PATH");
  if (path.empty()) path = "/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= path.size()) {
    const std::size_t colon = std::min(path.find(':', start), path.size());
    const std::string dir = path.substr(start, colon - start);
    const std::filesystem::path p = std::filesystem::path(dir.empty() ? "." : dir) / program;
    if (std::filesystem::exists(p, ec)) return p.string();
    start = colon + 1;
  }
  return std::string();
}

}  // namespace detail

inline bool kjv_available() {
  std::error_code ec;
  const std::string file = detail::env_or_empty("SMA_KJV_TEXT");
  if (!file.empty()) return std::filesystem::exists(file, ec);
  return !detail::find_program("bible").empty() && std::filesystem::exists("/usr/lib/bible.data", ec);
}

inline std::string load_kjv_text(const KjvOptions& options) {
  std::string file = options.text_file.empty() ? detail::env_or_empty("SMA_KJV_TEXT") : options.text_file;
  if (!file.empty()) return detail::read_text_file(file);

  const char* hint = "apt-get install bible-kjv bible-kjv-text, or set SMA_KJV_TEXT to a plain-text file";
  const std::string program = detail::find_program(options.program);
  if (program.empty()) throw IoError(str_cat("kjv: program '", options.program, "' not found on PATH (", hint, ")"));
  for (char c : program)
    if (c == '\'') throw ValueError(str_cat("kjv: program path ", program, " contains a quote"));
  // -f: one verse per line with its reference (no pretty-printing, no line breaking); stdin closed so that the
  // program never waits for interactive input.
  const std::string command = "'" + program + "' -f 'Gen1:1-Rev22:21' </dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) throw IoError(str_cat("kjv: cannot run ", command));
  std::string raw;
  char buf[1 << 16];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) raw.append(buf, n);
  const int status = ::pclose(pipe);
  if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw IoError(str_cat("kjv: ", command, " failed (status ", status,
                          "); is its data file /usr/lib/bible.data "
                          "installed? (",
                          hint, ")"));

  std::string text;
  text.reserve(raw.size());
  Index lines = 0;
  std::size_t pos = 0;
  while (pos < raw.size()) {
    std::size_t eol = raw.find('\n', pos);
    if (eol == std::string::npos) eol = raw.size();
    const std::size_t space = raw.find(' ', pos);
    if (space == std::string::npos || space >= eol || raw.find(':', pos) > space)
      throw IoError(str_cat("kjv: output of ", command, ", byte offset ", pos, ": line ", lines + 1,
                            " does not start with a verse reference"));
    if (lines == 0 && raw.compare(pos, space - pos, "Ge1:1") != 0)
      throw IoError(str_cat("kjv: output of ", command, " starts with '", raw.substr(pos, space - pos),
                            "', expected Genesis 1:1 ('Ge1:1')"));
    text.append(raw, options.references ? pos : space + 1, eol - (options.references ? pos : space + 1));
    text += '\n';
    ++lines;
    pos = eol + 1;
  }
  if (lines != kKjvVerses)
    throw IoError(str_cat("kjv: output of ", command, " has ", lines, " verse lines, expected ", kKjvVerses));
  return text;
}

}  // namespace sma::data
