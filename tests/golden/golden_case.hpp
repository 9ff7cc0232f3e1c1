// Running one golden case file (../shared/golden/README.md) against the library: shared by the sma-golden tool
// and the golden test suite. Cases: kind = ema | relpos | layer | model; everything is built from the file's
// `config` metadata and weights, so any file written in this format works, not only the ones in the folder.
#pragma once

#include <sma/io/safetensors.hpp>
#include <sma/io/state_dict.hpp>
#include <sma/layers/ema.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/models/seqboat_stream.hpp>
#include <sma/ops/rel_pos.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace sma::golden {

/// max |got - expected| / max |expected|, or max |got| when the expected tensor is all zeros.
struct Comparison {
  std::string tensor;
  double error = 0;
  bool zero_reference = false;
  bool ok = true;
};

struct CaseResult {
  std::string name;
  std::string kind;
  bool ok = true;
  double max_rel_err = 0;
  std::vector<Comparison> comparisons;
  std::string failure;  ///< first failing tensor and its error, or an exception message
  bool skipped = false;  ///< run_case_stream: the case cannot be streamed (reason in `note`)
  std::string note;      ///< run_case_stream: what was compared against what, when it is not the plain case
};

struct RunOptions {
  double tolerance = 1e-9;         ///< relative, per tensor (float64); the float32 runs use 1e-4
  double zero_tolerance = 1e-9;    ///< absolute, where the reference is all zeros
};

namespace detail {

inline bool is_case_tensor(const std::string& n) {
  static const char* prefixes[] = {"input", "output", "grad.", "grad_output", "inter.", "faithful.", "padding_mask"};
  for (const char* p : prefixes)
    if (n.compare(0, std::char_traits<char>::length(p), p) == 0) return true;
  return false;
}

/// (T, B, C) time-major -> (B, T, C) batch-first.
template <class T>
Tensor3<T> to_batch_first(const Tensor3<T>& x) {
  Tensor3<T> y(x.dimension(1), x.dimension(0), x.dimension(2));
  for (Index t = 0; t < x.dimension(0); ++t)
    for (Index b = 0; b < x.dimension(1); ++b)
      for (Index c = 0; c < x.dimension(2); ++c) y(b, t, c) = x(t, b, c);
  return y;
}

class Checker {
 public:
  Checker(const io::SafetensorsFile& f, CaseResult& r, const RunOptions& o) : file_(f), res_(r), opt_(o) {}

  /// Compares `got` (flat, in the file's layout) with tensor `name`; `rows` restricts the comparison to the given
  /// rows of the tensor seen as (size / last dim, last dim), used for the compressed intermediates [B, C', X].
  void compare(const std::string& name, const std::vector<double>& got, const std::vector<Index>* rows = nullptr) {
    if (!file_.contains(name)) return;
    const std::vector<double> exp = file_.values_as_double(name);
    Comparison c;
    c.tensor = name;
    if (exp.size() != got.size()) {
      c.ok = false;
      c.error = INFINITY;
      fail(c, str_cat("tensor=", name, " size ", got.size(), " != expected ", exp.size()));
      return;
    }
    const auto& shape = file_.info(name).shape;
    const std::size_t row_len = shape.empty() ? 1 : static_cast<std::size_t>(std::max<Index>(shape.back(), 1));
    std::vector<std::size_t> idx;
    if (rows) {
      for (Index r : *rows)
        for (std::size_t j = 0; j < row_len; ++j) idx.push_back(static_cast<std::size_t>(r) * row_len + j);
    } else {
      for (std::size_t i = 0; i < exp.size(); ++i) idx.push_back(i);
    }
    double max_exp = 0, max_diff = 0, max_got = 0;
    for (std::size_t i : idx) {
      max_exp = std::max(max_exp, std::abs(exp[i]));
      max_got = std::max(max_got, std::abs(got[i]));
      const double d = std::abs(got[i] - exp[i]);
      max_diff = std::isnan(d) ? INFINITY : std::max(max_diff, d);
    }
    if (max_exp == 0) {
      c.zero_reference = true;
      c.error = max_got;
      c.ok = max_got < opt_.zero_tolerance;
    } else {
      c.error = max_diff / max_exp;
      c.ok = c.error < opt_.tolerance;
      res_.max_rel_err = std::max(res_.max_rel_err, c.error);
    }
    if (!c.ok) fail(c, str_cat("tensor=", name, " err=", c.error, c.zero_reference ? " (max |got|, reference is 0)" : ""));
    res_.comparisons.push_back(c);
  }

  /// Exact comparison of integer / mask tensors.
  void compare_exact(const std::string& name, const std::vector<double>& got) {
    if (!file_.contains(name)) return;
    const std::vector<double> exp = file_.values_as_double(name);
    Comparison c;
    c.tensor = name;
    c.ok = exp == got;
    if (!c.ok) {
      std::size_t i = 0;
      while (i < exp.size() && i < got.size() && exp[i] == got[i]) ++i;
      c.error = 1;
      fail(c, str_cat("tensor=", name, " differs at flat index ", i, " (exact comparison)"));
    }
    res_.comparisons.push_back(c);
  }

 private:
  void fail(Comparison&, const std::string& why) {
    if (res_.ok) res_.failure = why;
    res_.ok = false;
  }
  const io::SafetensorsFile& file_;
  CaseResult& res_;
  const RunOptions& opt_;
};

template <class T, int R>
std::vector<double> flat(const Tensor<T, R>& t) {
  return std::vector<double>(t.data(), t.data() + t.size());
}
template <class T>
std::vector<double> flat_time_major(const Tensor3<T>& bf) {  // (B, T, C) -> flat (T, B, C)
  std::vector<double> v(static_cast<std::size_t>(bf.size()));
  const Index B = bf.dimension(0), L = bf.dimension(1), C = bf.dimension(2);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t)
      for (Index c = 0; c < C; ++c) v[static_cast<std::size_t>((t * B + b) * C + c)] = double(bf(b, t, c));
  return v;
}
template <class M>
std::vector<double> flat_matrix(const M& m) {
  std::vector<double> v(static_cast<std::size_t>(m.size()));
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) v[static_cast<std::size_t>(i * m.cols() + j)] = double(m(i, j));
  return v;
}

template <class T, class Model>
void compare_grads(Model& model, Checker& check) {
  for_each_param(model, [&](const std::string& name, Param<T>& p) {
    if (!p.trainable()) return;
    check.compare("grad." + name, std::vector<double>(p.grad(), p.grad() + p.size()));
  });
}

template <class T>
Mask load_padding(const io::SafetensorsFile& f) {
  return f.contains("padding_mask") ? f.tensor<std::uint8_t, 2>("padding_mask") : Mask();
}

/// Compares one SeqBoat layer's intermediates under `prefix` ("inter." or "inter.seq_layers.<i>.").
template <class T>
void compare_layer_intermediates(const SeqBoatLayer<T>& layer, const typename SeqBoatLayer<T>::Cache& c,
                                 const std::string& prefix, Checker& check) {
  const auto& cfg = layer.config();
  const Index B = c.batch, L = c.length, D = cfg.embed_dim;
  check.compare(prefix + (cfg.prenorm ? "norm_output" : "norm_input"), flat_time_major(c.norm_io));
  check.compare(prefix + "ema_output", flat_time_major(c.ema_out));
  check.compare(prefix + "hx_proj_output", flat_matrix(c.hu));
  check.compare(prefix + "router_probs", flat_matrix(c.router.probs));
  std::vector<double> active(static_cast<std::size_t>(B * L));
  for (Index i = 0; i < B * L; ++i) active[static_cast<std::size_t>(i)] = c.router.active(i / L, i % L);
  check.compare_exact(prefix + "activation_mask", active);
  std::vector<double> num(c.comp.num_active.begin(), c.comp.num_active.end());
  check.compare_exact(prefix + "num_active", num);
  // The reference's compressed length: max_b num_active (or 1 for its dummy position), or L uncompressed.
  const Index max_active = c.comp.max_active();
  const bool compressed = c.comp.compressed;
  check.compare_exact(prefix + "compress", {double(compressed ? 1 : 0)});
  check.compare_exact(prefix + "compressed_length", {double(compressed ? std::max<Index>(max_active, 1) : L)});
  if (c.comp.empty()) return;
  // Compressed intermediates: reference row (b, i) <-> our slot offsets[b] + i; compare activated rows only.
  const Index Cp = compressed ? max_active : L;
  std::vector<Index> ref_rows;
  std::vector<Index> our_rows;
  for (Index b = 0; b < B; ++b) {
    for (Index s = c.comp.offsets[b]; s < c.comp.offsets[b + 1]; ++s) {
      if (!c.comp.key_valid[static_cast<std::size_t>(s)]) continue;
      const Index i = s - c.comp.offsets[b];
      ref_rows.push_back(b * Cp + i);
      our_rows.push_back(s);
    }
  }
  auto scatter = [&](const Matrix<T>& ours) {
    std::vector<double> v(static_cast<std::size_t>(B * Cp * ours.cols()), 0.0);
    for (std::size_t k = 0; k < ref_rows.size(); ++k)
      for (Index j = 0; j < ours.cols(); ++j)
        v[static_cast<std::size_t>(ref_rows[k] * ours.cols() + j)] = double(ours(our_rows[k], j));
    return v;
  };
  check.compare(prefix + "mx_proj_output", scatter(c.gau.base), &ref_rows);
  check.compare(prefix + "attention_output", scatter(c.gau.att), &ref_rows);
  check.compare(prefix + "h_proj_output", scatter(c.hc), &ref_rows);
  (void)D;
}

}  // namespace detail

/// Runs one case in scalar type T. Never throws: errors become a failed result with the message.
template <class T>
CaseResult run_case(const std::string& path, const RunOptions& opt = {}) {
  CaseResult res;
  res.name = path;
  try {
    io::SafetensorsFile f(path);
    res.name = f.metadata().count("case") ? f.metadata_value("case") : path;
    res.kind = f.metadata_value("kind");
    const nlohmann::json cfg = nlohmann::json::parse(f.metadata_value("config"));
    detail::Checker check(f, res, opt);
    io::LoadOptions lo;
    lo.ignore = detail::is_case_tensor;
    Context ctx(Mode::eval);
    Mask pad = detail::load_padding<T>(f);
    if (pad.size()) ctx.padding = &pad;

    if (res.kind == "relpos") {
      const Index P = cfg.at("max_positions").get<Index>();
      const Index L = f.tensor<std::int64_t, 0>("input.seq_len")();
      Tensor1<T> table = f.tensor<T, 1>("rel_pos_bias");
      if (table.size() != 2 * P - 1)
        throw ShapeError(str_cat("rel_pos_bias has ", table.size(), " entries, expected 2*max_positions-1 = ", 2 * P - 1));
      const Tensor2<T> g = f.tensor<T, 2>("grad_output");
      std::vector<double> out(static_cast<std::size_t>(L * L)), grad(static_cast<std::size_t>(table.size()), 0.0);
      for (Index i = 0; i < L; ++i)
        for (Index j = 0; j < L; ++j) {
          const Index k = ops::simple_bias_index(P, i, j);
          out[static_cast<std::size_t>(i * L + j)] = double(table(k));
          grad[static_cast<std::size_t>(k)] += double(g(i, j));
        }
      check.compare("output", out);
      check.compare("grad.rel_pos_bias", grad);
    } else if (res.kind == "ema") {
      typename MultiHeadEma<T>::Config ec;
      ec.dim = cfg.at("embed_dim").get<Index>();
      ec.ndim = cfg.at("ndim").get<Index>();
      ec.direction = cfg.value("bidirectional", false) ? Direction::bidirectional : Direction::causal;
      ec.truncation = cfg.contains("truncation") && !cfg["truncation"].is_null() ? cfg["truncation"].get<Index>() : 0;
      MultiHeadEma<T> ema(ec);
      io::load_state_dict(ema, f, lo);
      const Tensor3<T> x = detail::to_batch_first(f.tensor<T, 3>("input"));
      typename MultiHeadEma<T>::Cache cache;
      const Tensor3<T> y = ema.forward(ctx, x, cache);
      check.compare("output", detail::flat_time_major(y));
      const Tensor3<T> g = detail::to_batch_first(f.tensor<T, 3>("grad_output"));
      zero_grad(ema);
      const Tensor3<T> dx = ema.backward(ctx, g, cache);
      check.compare("grad.input", detail::flat_time_major(dx));
      detail::compare_grads<T>(ema, check);
      check.compare("inter.kernel", detail::flat(ema.kernel(x.dimension(1))));
    } else if (res.kind == "layer") {
      SeqBoatLayer<T> layer(SeqBoatLayerConfig::from_reference_json(cfg));
      io::load_state_dict(layer, f, lo);
      const Tensor3<T> x = detail::to_batch_first(f.tensor<T, 3>("input"));
      typename SeqBoatLayer<T>::Cache cache;
      const Tensor3<T> y = layer.forward(ctx, x, cache);
      check.compare("output", detail::flat_time_major(y));
      detail::compare_layer_intermediates(layer, cache, "inter.", check);
      const Tensor3<T> g = detail::to_batch_first(f.tensor<T, 3>("grad_output"));
      zero_grad(layer);
      const Tensor3<T> dx = layer.backward(ctx, g, cache);
      check.compare("grad.input", detail::flat_time_major(dx));
      detail::compare_grads<T>(layer, check);
    } else if (res.kind == "model") {
      SeqBoatModel<T> model(SeqBoatModelConfig::from_reference_json(cfg));
      io::load_state_dict(model, f, lo);
      const Tensor3<T> x = f.tensor<T, 3>("input");
      typename SeqBoatModel<T>::Cache cache;
      const Tensor2<T> y = model.forward(ctx, x, cache);
      check.compare("output", detail::flat(y));
      for (Index i = 0; i < model.layers().size(); ++i) {
        const std::string prefix = str_cat("inter.seq_layers.", i, ".");
        detail::compare_layer_intermediates(model.layers()[i], cache.layers[static_cast<std::size_t>(i)], prefix, check);
        // Each layer's output, rebuilt from its cache: silu(pre), then the post-norm if any.
        const auto& lc = cache.layers[static_cast<std::size_t>(i)];
        auto& layer = model.layers()[i];
        Tensor3<T> out_i(lc.pre.dimensions());
        as_matrix(out_i) = silu(as_matrix(lc.pre));
        if (!layer.config().prenorm) {
          typename SequenceNorm<T>::Cache nc;
          out_i = layer.norm().forward(ctx, out_i, nc);
        }
        check.compare(prefix + "output", detail::flat_time_major(out_i));
      }
      const Tensor2<T> g = f.tensor<T, 2>("grad_output");
      zero_grad(model);
      const Tensor3<T> dx = model.backward(ctx, g, cache);
      check.compare("grad.input", detail::flat(dx));
      detail::compare_grads<T>(model, check);
    } else {
      throw ValueError(str_cat("unknown case kind '", res.kind, "' (expected ema, relpos, layer or model)"));
    }
    if (res.comparisons.empty()) {
      res.ok = false;
      res.failure = "nothing was compared (no output tensor in the file?)";
    }
  } catch (const std::exception& e) {
    res.ok = false;
    res.failure = str_cat("error: ", e.what());
  }
  return res;
}

namespace detail {

/// The real length of each row, for padding that sits at the end of rows (the golden cases' layout); throws when a
/// row has a real token after a padded one (a stream would then see other positions than the full forward).
inline std::vector<Index> trailing_lengths(const Mask& pad, Index B, Index L) {
  std::vector<Index> len(static_cast<std::size_t>(B), L);
  if (!pad.size()) return len;
  for (Index b = 0; b < B; ++b) {
    Index n = 0;
    while (n < L && !pad(b, n)) ++n;
    for (Index t = n; t < L; ++t)
      if (!pad(b, t)) throw ValueError(str_cat("padding row ", b, " has a real token at ", t, " after padding"));
    len[static_cast<std::size_t>(b)] = n;
  }
  return len;
}

/// Rows (t * B + b) of a time-major (T, B, X) tensor at real positions.
inline std::vector<Index> real_rows_time_major(const std::vector<Index>& len, Index B, Index L) {
  std::vector<Index> rows;
  for (Index t = 0; t < L; ++t)
    for (Index b = 0; b < B; ++b)
      if (t < len[static_cast<std::size_t>(b)]) rows.push_back(t * B + b);
  return rows;
}

/// True when the reference ran this layer uncompressed (one row fully activated) while another row was not fully
/// activated: its attention windows then count original positions, which a stream (per-row compression) does not.
inline bool reference_fallback_differs(const io::SafetensorsFile& f, const std::string& prefix,
                                       const std::vector<Index>& len) {
  if (!f.contains(prefix + "compress") || f.values_as_double(prefix + "compress").at(0) != 0) return false;
  if (!f.contains(prefix + "num_active")) return false;
  const auto num = f.values_as_double(prefix + "num_active");
  for (std::size_t b = 0; b < num.size(); ++b)
    if (num[b] != double(len[b])) return true;
  return false;
}

}  // namespace detail

/// Streams one causal case token by token (SeqBoatLayerStreamer / SeqBoatModelStreamer / MultiHeadEma::step) and
/// compares every position's output, and the router's decisions, with the stored full-sequence results, within the
/// same tolerances as run_case. Bidirectional cases and relpos are skipped (`skipped`, reason in `note`). Padding
/// must sit at the end of rows (the golden layout): every stream takes all T tokens, and only real positions are
/// compared (a stream's padded tail never reaches its earlier outputs). Where the reference's batch-wide
/// uncompressed fallback changed a layer's attention windows (see docs/routing.md), the stream is compared with the
/// library's own full forward under RoutingSemantics::per_row instead, and `note` says so.
template <class T>
CaseResult run_case_stream(const std::string& path, const RunOptions& opt = {}) {
  CaseResult res;
  res.name = path;
  try {
    io::SafetensorsFile f(path);
    res.name = f.metadata().count("case") ? f.metadata_value("case") : path;
    res.kind = f.metadata_value("kind");
    const nlohmann::json cfg = nlohmann::json::parse(f.metadata_value("config"));
    detail::Checker check(f, res, opt);
    io::LoadOptions lo;
    lo.ignore = detail::is_case_tensor;
    const bool bidir = cfg.value("bidirectional", false);
    if (res.kind == "relpos" || bidir) {
      res.skipped = true;
      res.note = bidir ? "bidirectional" : "not a sequence model";
      return res;
    }
    Mask pad = detail::load_padding<T>(f);

    if (res.kind == "ema") {
      typename MultiHeadEma<T>::Config ec;
      ec.dim = cfg.at("embed_dim").get<Index>();
      ec.ndim = cfg.at("ndim").get<Index>();
      ec.direction = Direction::causal;
      ec.truncation = cfg.contains("truncation") && !cfg["truncation"].is_null() ? cfg["truncation"].get<Index>() : 0;
      MultiHeadEma<T> ema(ec);
      io::load_state_dict(ema, f, lo);
      const Tensor3<T> x = detail::to_batch_first(f.tensor<T, 3>("input"));
      const Index B = x.dimension(0), L = x.dimension(1), D = x.dimension(2);
      const auto len = detail::trailing_lengths(pad, B, L);
      auto st = ema.make_state(B);
      Tensor3<T> y(B, L, D);
      for (Index t = 0; t < L; ++t) {
        Tensor2<T> xt(B, D);
        for (Index b = 0; b < B; ++b)
          for (Index d = 0; d < D; ++d) xt(b, d) = x(b, t, d);
        const Tensor2<T> yt = ema.step(xt, st);
        for (Index b = 0; b < B; ++b)
          for (Index d = 0; d < D; ++d) y(b, t, d) = yt(b, d);
      }
      const auto rows = detail::real_rows_time_major(len, B, L);
      check.compare("output", detail::flat_time_major(y), &rows);
    } else if (res.kind == "layer") {
      SeqBoatLayerConfig lc = SeqBoatLayerConfig::from_reference_json(cfg);
      SeqBoatLayer<T> layer(lc);
      io::load_state_dict(layer, f, lo);
      const Tensor3<T> x = detail::to_batch_first(f.tensor<T, 3>("input"));
      const Index B = x.dimension(0), L = x.dimension(1), D = x.dimension(2);
      const auto len = detail::trailing_lengths(pad, B, L);
      SeqBoatLayerStreamer<T> streamer(layer);
      auto st = streamer.make_state(B);
      Tensor3<T> y(B, L, D);
      std::vector<double> active(static_cast<std::size_t>(B * L), 0.0);
      for (Index t = 0; t < L; ++t) {
        Tensor2<T> xt(B, D);
        for (Index b = 0; b < B; ++b)
          for (Index d = 0; d < D; ++d) xt(b, d) = x(b, t, d);
        StreamTrace tr;
        const Tensor2<T> yt = streamer.step(xt, st, &tr);
        for (Index b = 0; b < B; ++b) {
          for (Index d = 0; d < D; ++d) y(b, t, d) = yt(b, d);
          if (t < len[static_cast<std::size_t>(b)]) active[static_cast<std::size_t>(b * L + t)] = tr.active(b, 0);
        }
      }
      const auto rows = detail::real_rows_time_major(len, B, L);
      if (detail::reference_fallback_differs(f, "inter.", len)) {
        // The stored numbers come from the batch-wide uncompressed path; streams are per row by design.
        res.note = "reference fell back to the uncompressed path: compared with sma's full forward under per_row";
        layer.config().routing = RoutingSemantics::per_row;
        Context ctx(Mode::eval);
        if (pad.size()) ctx.padding = &pad;
        typename SeqBoatLayer<T>::Cache c;
        const Tensor3<T> full = layer.forward(ctx, x, c);
        const auto got = detail::flat_time_major(y), want = detail::flat_time_major(full);
        double dmax = 0, emax = 0;
        for (Index r : rows)
          for (Index d = 0; d < D; ++d) {
            const auto i = static_cast<std::size_t>(r * D + d);
            dmax = std::max(dmax, std::abs(got[i] - want[i]));
            emax = std::max(emax, std::abs(want[i]));
          }
        Comparison cmp;
        cmp.tensor = "output (per_row full forward)";
        cmp.error = emax > 0 ? dmax / emax : dmax;
        cmp.ok = cmp.error < opt.tolerance;
        res.max_rel_err = std::max(res.max_rel_err, cmp.error);
        if (!cmp.ok) {
          res.ok = false;
          res.failure = str_cat("tensor=", cmp.tensor, " err=", cmp.error);
        }
        res.comparisons.push_back(cmp);
      } else {
        check.compare("output", detail::flat_time_major(y), &rows);
        check.compare_exact("inter.activation_mask", active);
      }
    } else if (res.kind == "model") {
      SeqBoatModel<T> model(SeqBoatModelConfig::from_reference_json(cfg));
      io::load_state_dict(model, f, lo);
      const Tensor3<T> x = f.tensor<T, 3>("input");  // (B, T, d_input), batch-first
      const Index B = x.dimension(0), L = x.dimension(1), Din = x.dimension(2), D = model.config().d_model;
      const auto len = detail::trailing_lengths(pad, B, L);
      if (pad.size()) throw ValueError("model cases take no padding mask");
      for (Index i = 0; i < model.layers().size(); ++i)
        if (detail::reference_fallback_differs(f, str_cat("inter.seq_layers.", i, "."), len))
          throw ValueError(str_cat("layer ", i, ": the reference's uncompressed fallback changed the windows; "
                                   "a model case like this cannot be stream-compared"));
      SeqBoatModelStreamer<T> streamer(model);
      auto st = streamer.make_state(B);
      const std::size_t NL = static_cast<std::size_t>(model.layers().size());
      std::vector<Tensor3<T>> layer_y(NL, Tensor3<T>(B, L, D));
      std::vector<std::vector<double>> active(NL, std::vector<double>(static_cast<std::size_t>(B * L), 0.0));
      Tensor3<T> logits;
      for (Index t = 0; t < L; ++t) {
        Tensor3<T> xt(B, 1, Din);
        for (Index b = 0; b < B; ++b)
          for (Index d = 0; d < Din; ++d) xt(b, 0, d) = x(b, t, d);
        std::vector<Tensor3<T>> outs;
        std::vector<StreamTrace> traces;
        logits = streamer.step_chunk(xt, st, &outs, &traces);
        for (std::size_t i = 0; i < NL; ++i)
          for (Index b = 0; b < B; ++b) {
            for (Index d = 0; d < D; ++d) layer_y[i](b, t, d) = outs[i](b, 0, d);
            active[i][static_cast<std::size_t>(b * L + t)] = traces[i].active(b, 0);
          }
      }
      for (std::size_t i = 0; i < NL; ++i) {
        const std::string prefix = str_cat("inter.seq_layers.", i, ".");
        check.compare(prefix + "output", detail::flat_time_major(layer_y[i]));
        check.compare_exact(prefix + "activation_mask", active[i]);
      }
      Tensor2<T> last(B, model.config().d_output);
      for (Index b = 0; b < B; ++b)
        for (Index o = 0; o < last.dimension(1); ++o) last(b, o) = logits(b, 0, o);
      check.compare("output", detail::flat(last));
    } else {
      throw ValueError(str_cat("unknown case kind '", res.kind, "' (expected ema, relpos, layer or model)"));
    }
    if (res.comparisons.empty()) {
      res.ok = false;
      res.failure = "nothing was compared (no output tensor in the file?)";
    }
  } catch (const std::exception& e) {
    res.ok = false;
    res.failure = str_cat("error: ", e.what());
  }
  return res;
}

}  // namespace sma::golden
