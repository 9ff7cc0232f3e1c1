// sma/data/listops.hpp: ListOps, generated as in the Long Range Arena (Tay et al. 2020), with tokenizer and evaluator.
//
// An expression is a digit 0-9 or an operator applied to 2..max_args arguments, each itself an expression:
//   [MAX 4 3 [MIN 2 3 ] 1 0 ]   = 4
// Operators (LRA's lra_benchmarks/data/listops.py, "basic" task):
//   [MIN  smallest argument          [MAX  largest argument
//   [MED  int(np.median(args)): the middle argument; for an even count the mean of the two middle ones rounded
//         down (they are non-negative, so int() truncation is the floor): [MED 1 2 ] = 1, [MED 3 4 5 8 ] = 4
//   [SM   sum of the arguments modulo 10
// The label is the expression's value (10 classes). LRA's generator, reproduced here draw for draw in structure
// (not in random stream: Python's `random` is not used), starts at depth 1; at depth d < max_depth a node is a
// digit with probability 1 - value_p (LRA: value_p = 0.25) and otherwise an operator with uniform 2..max_args
// children, generated first, and a uniform operator; at depth max_depth it is a digit. A tree's length counts
// one token per digit, operator and closing bracket; LRA keeps trees with min_length < length < max_length
// (500 and 2000) and removes duplicates. LRA's files write the tree with extra parentheses "( ( [MAX 4 ) 3 ) ..."
// that its input pipeline strips; the tokenizer here ignores "(" and ")" tokens, so it reads those files too.
#pragma once

#include <sma/data/dataset.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

namespace sma::data {

/// ListOps vocabulary: pad 0, digits 0-9 as 1-10, the four operators (opening tokens) 11-14, "]" 15.
namespace listops {
enum Token : std::int32_t {
  pad = 0,
  digit0 = 1,  // digit k is digit0 + k
  op_min = 11,
  op_max = 12,
  op_med = 13,
  op_sm = 14,
  close = 15,
};
inline constexpr Index vocab_size = 16;
inline constexpr Index num_classes = 10;
/// The text of each token id ("<pad>", "0".."9", "[MIN", "[MAX", "[MED", "[SM", "]").
inline const char* token_text(std::int32_t id) {
  static const char* const text[] = {"<pad>", "0", "1", "2",    "3",    "4",    "5",   "6",
                                     "7",     "8", "9", "[MIN", "[MAX", "[MED", "[SM", "]"};
  return id >= 0 && id < vocab_size ? text[id] : "<invalid>";
}
inline bool is_digit(std::int32_t id) { return id >= digit0 && id < digit0 + 10; }
inline bool is_operator(std::int32_t id) { return id >= op_min && id <= op_sm; }
}  // namespace listops

/// Generator settings; the defaults are LRA's.
struct ListOpsConfig {
  Index max_depth = 10;     ///< nodes at this depth (the root is depth 1) are digits
  Index max_args = 10;      ///< operators take 2..max_args arguments
  Index min_length = 500;   ///< keep trees with min_length < length (exclusive, as LRA)
  Index max_length = 2000;  ///< ... and length < max_length (exclusive, as LRA)
  double value_p = 0.25;    ///< LRA's VALUE_P: the probability that a node above max_depth is an operator
  bool unique = true;       ///< no two examples with the same expression (LRA keeps a set)
  Index max_attempts = 0;   ///< give up (ValueError) after this many draws per example; 0 = 100000 + 1000 * n
};

/// Token ids of an expression in the bracket syntax ("[MAX 4 3 [MIN 2 3 ] 1 0 ]"): whitespace-separated tokens;
/// "(" and ")" are skipped (LRA's files). Throws ValueError naming an unknown token and its position.
inline std::vector<std::int32_t> listops_tokenize(const std::string& text);
/// The bracket syntax of token ids (pads are skipped). Throws ValueError for an id outside the vocabulary.
inline std::string listops_detokenize(const std::vector<std::int32_t>& tokens);
/// The value 0-9 of a tokenized expression (trailing pads allowed). Throws ValueError naming the position for a
/// malformed one: "]" without an operator, an operator without arguments, unclosed brackets, tokens after the end.
inline int listops_evaluate(const std::vector<std::int32_t>& tokens);
/// listops_evaluate(listops_tokenize(text)).
inline int listops_evaluate(const std::string& text) { return listops_evaluate(listops_tokenize(text)); }

/// Draws one tree (root at depth 1) with LRA's procedure, without the length filter; writes its tokens to `tokens`
/// and returns its value. Drawing stops early, returning -1, once the tree has max_length tokens or more (such a
/// tree would be rejected anyway: this only saves time).
inline int listops_draw(Rng& rng, const ListOpsConfig& config, std::vector<std::int32_t>& tokens);

/// `n` examples drawn with `seed` (label = value). Name "listops", vocab 16, pad 0, 10 classes.
inline Dataset generate_listops(Index n, const ListOpsConfig& config = {}, std::uint64_t seed = 0);
/// As LRA: n_train + n_valid + n_test distinct examples in one draw, cut in that order (LRA: 96000/2000/2000).
inline Splits generate_listops_splits(Index n_train, Index n_valid, Index n_test, const ListOpsConfig& config = {},
                                      std::uint64_t seed = 0);
/// An LRA ListOps .tsv file (header "Source\tTarget", then "<expression>\t<value>" lines). The value is checked
/// against the evaluator; IoError names the file and line of a malformed row.
inline Dataset load_listops_tsv(const std::string& path);

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

inline int listops_apply(std::int32_t op, std::vector<int>& args) {
  switch (op) {
    case listops::op_min:
      return *std::min_element(args.begin(), args.end());
    case listops::op_max:
      return *std::max_element(args.begin(), args.end());
    case listops::op_sm: {
      int s = 0;
      for (int a : args) s += a;
      return s % 10;
    }
    default: {  // op_med: np.median, then int()
      std::sort(args.begin(), args.end());
      const std::size_t k = args.size();
      return k % 2 ? args[k / 2] : (args[k / 2 - 1] + args[k / 2]) / 2;
    }
  }
}

struct ListOpsDraw {
  Rng& rng;
  const ListOpsConfig& cfg;
  std::vector<std::int32_t>& out;

  // Returns the node's value, or -1 once the tokens reach max_length.
  int node(Index depth) {
    const double r = depth < cfg.max_depth ? rng.uniform() : 1.0;
    if (r > cfg.value_p) {
      const int v = static_cast<int>(rng.below(10));
      out.push_back(listops::digit0 + v);
      return static_cast<Index>(out.size()) >= cfg.max_length ? -1 : v;
    }
    const std::size_t op_at = out.size();
    out.push_back(listops::pad);  // the operator is drawn after its arguments (as LRA does)
    const Index nargs = rng.between(2, cfg.max_args);
    std::vector<int> args;
    args.reserve(static_cast<std::size_t>(nargs));
    for (Index i = 0; i < nargs; ++i) {
      const int v = node(depth + 1);
      if (v < 0) return -1;
      args.push_back(v);
    }
    const auto op = static_cast<std::int32_t>(listops::op_min + static_cast<std::int32_t>(rng.below(4)));
    out[op_at] = op;
    out.push_back(listops::close);
    if (static_cast<Index>(out.size()) >= cfg.max_length) return -1;
    return listops_apply(op, args);
  }
};

inline void check_listops_config(const ListOpsConfig& c) {
  if (c.max_depth < 1 || c.max_depth > 10000)
    throw ValueError(str_cat("ListOpsConfig: max_depth = ", c.max_depth, " must be in [1, 10000]"));
  if (c.max_args < 2) throw ValueError(str_cat("ListOpsConfig: max_args = ", c.max_args, " must be at least 2"));
  if (c.max_length <= c.min_length + 1)
    throw ValueError(
        str_cat("ListOpsConfig: no length fits min_length ", c.min_length, " < length < max_length ", c.max_length));
  if (!(c.value_p >= 0 && c.value_p <= 1))
    throw ValueError(str_cat("ListOpsConfig: value_p = ", c.value_p, " must be in [0, 1]"));
  if (c.max_attempts < 0) throw ValueError(str_cat("ListOpsConfig: max_attempts = ", c.max_attempts, " is negative"));
}

inline Dataset listops_empty(const std::string& name) {
  Dataset ds;
  ds.name = name;
  ds.vocab_size = listops::vocab_size;
  ds.pad_token = listops::pad;
  ds.feature_dim = 1;
  ds.num_classes = listops::num_classes;
  for (int k = 0; k < 10; ++k) ds.class_names.push_back(std::to_string(k));
  return ds;
}

}  // namespace detail

inline std::vector<std::int32_t> listops_tokenize(const std::string& text) {
  std::vector<std::int32_t> out;
  std::istringstream in(text);
  std::string tok;
  Index pos = 0;
  while (in >> tok) {
    std::int32_t id = -1;
    if (tok == "(" || tok == ")") {
      ++pos;
      continue;
    }
    if (tok.size() == 1 && tok[0] >= '0' && tok[0] <= '9')
      id = listops::digit0 + (tok[0] - '0');
    else if (tok == "]")
      id = listops::close;
    else if (tok == "[MIN")
      id = listops::op_min;
    else if (tok == "[MAX")
      id = listops::op_max;
    else if (tok == "[MED")
      id = listops::op_med;
    else if (tok == "[SM")
      id = listops::op_sm;
    if (id < 0) throw ValueError(str_cat("listops_tokenize: unknown token '", tok, "' at token ", pos));
    out.push_back(id);
    ++pos;
  }
  return out;
}

inline std::string listops_detokenize(const std::vector<std::int32_t>& tokens) {
  std::string s;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const std::int32_t id = tokens[i];
    if (id == listops::pad) continue;
    if (id < 0 || id >= listops::vocab_size)
      throw ValueError(str_cat("listops_detokenize: id ", id, " at position ", i, " is outside [0, 16)"));
    if (!s.empty()) s += ' ';
    s += listops::token_text(id);
  }
  return s;
}

inline int listops_evaluate(const std::vector<std::int32_t>& tokens) {
  struct Frame {
    std::int32_t op;
    std::vector<int> args;
  };
  std::vector<Frame> stack;
  int result = -1;
  std::size_t end = tokens.size();
  while (end > 0 && tokens[end - 1] == listops::pad) --end;
  auto fail = [](std::size_t i, const std::string& what) {
    return ValueError(str_cat("listops_evaluate: position ", i, ": ", what));
  };
  for (std::size_t i = 0; i < end; ++i) {
    const std::int32_t id = tokens[i];
    if (result >= 0) throw fail(i, str_cat("token ", listops::token_text(id), " after the end of the expression"));
    int value = -1;
    if (listops::is_digit(id)) {
      value = id - listops::digit0;
    } else if (listops::is_operator(id)) {
      stack.push_back({id, {}});
      continue;
    } else if (id == listops::close) {
      if (stack.empty()) throw fail(i, "']' without an open operator");
      Frame f = std::move(stack.back());
      stack.pop_back();
      if (f.args.empty()) throw fail(i, str_cat(listops::token_text(f.op), " has no arguments"));
      value = detail::listops_apply(f.op, f.args);
    } else {
      throw fail(i, str_cat("token id ", id, id == listops::pad ? " (pad) inside the expression" : " is unknown"));
    }
    if (stack.empty())
      result = value;
    else
      stack.back().args.push_back(value);
  }
  if (!stack.empty()) throw fail(end, str_cat(stack.size(), " unclosed operator(s)"));
  if (result < 0) throw fail(0, "empty expression");
  return result;
}

inline int listops_draw(Rng& rng, const ListOpsConfig& config, std::vector<std::int32_t>& tokens) {
  detail::check_listops_config(config);
  tokens.clear();
  detail::ListOpsDraw d{rng, config, tokens};
  return d.node(1);
}

inline Dataset generate_listops(Index n, const ListOpsConfig& config, std::uint64_t seed) {
  detail::check_listops_config(config);
  if (n < 0) throw ValueError(str_cat("generate_listops: n = ", n, " is negative"));
  Dataset ds = detail::listops_empty("listops");
  ds.examples.reserve(static_cast<std::size_t>(n));
  Rng rng(seed);
  std::unordered_set<std::string> seen;
  std::vector<std::int32_t> tokens;
  const Index max_attempts = config.max_attempts > 0 ? config.max_attempts : 100000 + 1000 * n;
  Index attempts = 0;
  while (ds.size() < n) {
    if (++attempts > max_attempts)
      throw ValueError(str_cat("generate_listops: only ", ds.size(), " of ", n, " examples after ", max_attempts,
                               " draws: min_length ", config.min_length, ", max_length ", config.max_length,
                               ", max_depth ", config.max_depth, " and max_args ", config.max_args,
                               " rarely (or never) give such trees"));
    const int value = detail::ListOpsDraw{rng, config, tokens}.node(1);
    const Index len = static_cast<Index>(tokens.size());
    if (value < 0 || len <= config.min_length || len >= config.max_length) {
      tokens.clear();
      continue;
    }
    if (config.unique) {
      std::string key(reinterpret_cast<const char*>(tokens.data()), tokens.size() * sizeof(std::int32_t));
      if (!seen.insert(std::move(key)).second) {
        tokens.clear();
        continue;
      }
    }
    Example e;
    e.tokens = tokens;
    e.label = value;
    ds.examples.push_back(std::move(e));
    tokens.clear();
  }
  return ds;
}

inline Splits generate_listops_splits(Index n_train, Index n_valid, Index n_test, const ListOpsConfig& config,
                                      std::uint64_t seed) {
  if (n_train < 0 || n_valid < 0 || n_test < 0)
    throw ValueError(str_cat("generate_listops_splits: negative size ", n_train, "/", n_valid, "/", n_test));
  Dataset all = generate_listops(n_train + n_valid + n_test, config, seed);
  Splits s;
  s.train = detail::listops_empty("listops/train");
  s.valid = detail::listops_empty("listops/valid");
  s.test = detail::listops_empty("listops/test");
  auto move_range = [&](Dataset& to, Index from, Index count) {
    for (Index i = from; i < from + count; ++i)
      to.examples.push_back(std::move(all.examples[static_cast<std::size_t>(i)]));
  };
  move_range(s.train, 0, n_train);
  move_range(s.valid, n_train, n_valid);
  move_range(s.test, n_train + n_valid, n_test);
  return s;
}

inline Dataset load_listops_tsv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(str_cat(path, ": cannot open for reading"));
  Dataset ds = detail::listops_empty(str_cat("listops:", path));
  std::string line;
  Index lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (lineno == 1 && line.rfind("Source", 0) == 0)) continue;
    const std::size_t tab = line.rfind('\t');
    if (tab == std::string::npos) throw IoError(str_cat(path, ": line ", lineno, ": no tab between source and target"));
    const std::string target = line.substr(tab + 1);
    if (target.size() != 1 || target[0] < '0' || target[0] > '9')
      throw IoError(str_cat(path, ": line ", lineno, ": target '", target, "' is not a digit"));
    Example e;
    try {
      e.tokens = listops_tokenize(line.substr(0, tab));
      const int v = listops_evaluate(e.tokens);
      if (v != target[0] - '0')
        throw ValueError(str_cat("the expression evaluates to ", v, ", the file says ", target));
    } catch (const ValueError& err) {
      throw IoError(str_cat(path, ": line ", lineno, ": ", err.what()));
    }
    e.label = target[0] - '0';
    ds.examples.push_back(std::move(e));
  }
  if (in.bad()) throw IoError(str_cat(path, ": read error after line ", lineno));
  return ds;
}

}  // namespace sma::data
