// sma/models/seqboat_stream.hpp: streaming (incremental) inference for causal SeqBoat layers and the causal
// SeqBoatModel: tokens arrive one (or a chunk) at a time, for a batch of independent streams, and the cost per token
// does not grow with the position. docs/streaming.md has the design, the equality argument and the limits.
//
// WHAT     SeqBoatLayerStreamer::step(x_t) gives exactly what SeqBoatLayer::forward gives at that position, up to
//          rounding, from a fixed-size state (SeqBoatLayerState):
//            - the EMA state (B, D, N) (and, with an EMA truncation K, the last K EMA inputs), advanced by the
//              recurrence s = q s + p beta x (ops/ema.hpp's coefficients);
//            - the ring buffer of the last W activated tokens' prepared keys (rotated for rotary), values and
//              original positions; a token's compressed slot index is its activated-token ordinal, kept as a count.
//          A token the router does not activate costs the norm, the EMA, hx_proj and the router only; an activated
//          one adds mx_proj, one query over at most W+1 keys (ops/attention_step.hpp) and h_proj.
// EQUALITY The full forward under RoutingSemantics::per_row (every row compressed on its own), which equals the
//          default `reference` semantics for B = 1 and for any batch in which no row is fully activated or every
//          row is. Streams take no padding mask: feed each stream its real tokens only. Evaluation mode only
//          (dropout is the identity; BatchNorm uses its running statistics).
// STATE    Value type: copy it, reset rows, move rows between states (a server's slots), save/load it as
//          safetensors bytes or files, validated against the streamer's configuration (and, by default, a
//          fingerprint of the weights). bytes() is independent of the position.
// THREADS  A streamer caches derived EMA coefficients (refreshed automatically whenever the EMA parameters change),
//          so step() is not const: use one streamer per thread. It keeps a pointer to its layer/model, which must
//          outlive it and stay at the same address.
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/error.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/io/safetensors.hpp>
#include <sma/layers/activation.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/ops/attention_step.hpp>
#include <sma/ops/ema.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace sma {

/// The streaming state of one causal SeqBoat layer for B independent streams (one per batch row). Every field has a
/// fixed size: B, D (embed_dim), N (ndim), K (EMA truncation, 0 = none), W (window), Z (zdim), H (hdim).
template <class T>
struct SeqBoatLayerState {
  Tensor3<T> ema;                         ///< (B, D, N) EMA state, MultiHeadEma::StreamState::s's layout
  Tensor3<T> ema_history;                 ///< (B, K, D) the last K EMA inputs (ring, slot = position % K)
  Tensor3<T> keys;                        ///< (B, W, Z) prepared keys of the last W activated tokens (slot = ordinal % W)
  Tensor3<T> values;                      ///< (B, W, H) their values
  Tensor2<std::int64_t> key_positions;    ///< (B, W) their original positions
  std::vector<std::int64_t> position;     ///< (B) tokens consumed
  std::vector<std::int64_t> activated;    ///< (B) tokens routed to attention so far = the next one's ordinal
  std::vector<std::uint8_t> last_active;  ///< (B) the router's decision for the most recent token
  std::vector<T> last_gate;               ///< (B) its gate (the larger router probability; 0 when not activated)

  Index batch() const { return static_cast<Index>(position.size()); }
  Index window() const { return keys.dimension(1); }
  /// Ring entries in use for row b: min(activated, W), always slots [0, count).
  Index memory_size(Index b) const {
    return static_cast<Index>(std::min<std::int64_t>(activated.at(static_cast<std::size_t>(b)), window()));
  }
  /// Bytes held (payload of every field; independent of the positions).
  std::size_t bytes() const {
    return sizeof(T) * static_cast<std::size_t>(ema.size() + ema_history.size() + keys.size() + values.size()) +
           sizeof(std::int64_t) * static_cast<std::size_t>(key_positions.size()) +
           (2 * sizeof(std::int64_t) + sizeof(std::uint8_t) + sizeof(T)) * position.size();
  }
  /// Row b back to the start of a stream (position 0, nothing remembered).
  void reset_row(Index b);
  void reset() {
    for (Index b = 0; b < batch(); ++b) reset_row(b);
  }
  /// A one-row state holding a copy of row b.
  SeqBoatLayerState row(Index b) const;
  /// Row b <- row src_b of `src` (same D, N, K, W, Z, H; ShapeError otherwise).
  void set_row(Index b, const SeqBoatLayerState& src, Index src_b = 0);
};

/// Per-token router decisions of one step_chunk call.
struct StreamTrace {
  Tensor2<std::uint8_t> active;  ///< (B, C) 1 = routed to attention
  Tensor2<double> gate;          ///< (B, C)
};

/// Options of the state loaders.
struct StreamLoadOptions {
  /// Refuse a state saved with different weights (a 64-bit fingerprint of every parameter is stored and compared).
  bool require_same_weights = true;
};

namespace detail {

template <class T>
constexpr const char* scalar_name() {
  return std::is_same<T, float>::value ? "float32" : "float64";
}

/// FNV-1a over the bytes of every parameter (names included), for "was this state made with these weights".
template <class Model>
std::uint64_t params_fingerprint(const Model& model) {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  };
  // visit_params is not const (it hands out mutable Params for loading); this visitor only reads.
  for_each_param(const_cast<Model&>(model), [&](const std::string& name, const auto& p) {
    mix(name.data(), name.size());
    mix(p.data(), sizeof(*p.data()) * static_cast<std::size_t>(p.size()));
  });
  return h;
}

/// Copies row `src_b` of a batch-first tensor into row `dst_b` of another of the same trailing shape.
template <class Scalar, int R>
void copy_tensor_row(const Tensor<Scalar, R>& src, Index src_b, Tensor<Scalar, R>& dst, Index dst_b) {
  const Index n = src.dimension(0) ? src.size() / src.dimension(0) : 0;
  std::copy(src.data() + src_b * n, src.data() + (src_b + 1) * n, dst.data() + dst_b * n);
}

template <class Scalar, int R>
void zero_tensor_row(Tensor<Scalar, R>& t, Index b) {
  const Index n = t.dimension(0) ? t.size() / t.dimension(0) : 0;
  std::fill(t.data() + b * n, t.data() + (b + 1) * n, Scalar(0));
}

template <class Scalar, int R>
void check_trailing_dims(const Tensor<Scalar, R>& a, const Tensor<Scalar, R>& b, const char* what) {
  for (int i = 1; i < R; ++i)
    if (a.dimension(i) != b.dimension(i))
      throw ShapeError(str_cat("SeqBoatLayerState::set_row: ", what, " is ", shape_string(dims_of(a)),
                               " here but ", shape_string(dims_of(b)), " in the source state"));
}

/// The EMA's step coefficients in (D, N) layout, recomputed whenever the EMA parameters or truncation change (the
/// check compares a copy of the raw parameters: O(D N), far cheaper than recomputing the exponentials).
template <class T>
class EmaStepCoefficients {
 public:
  struct View {
    const T *q, *b, *c, *bqk;  // (D, N) each
    const T* omega;            // (D)
    Index dim, order, truncation;
  };

  View get(const MultiHeadEma<T>& ema) {
    const Param<T>*delta = nullptr, *alpha = nullptr, *beta = nullptr, *gamma = nullptr, *omega = nullptr;
    // visit_params is not const (it hands out mutable Params for loading); this visitor only reads.
    const_cast<MultiHeadEma<T>&>(ema).visit_params([&](const std::string& name, Param<T>& p) {
      if (name == "delta") delta = &p;
      else if (name == "alpha") alpha = &p;
      else if (name == "beta") beta = &p;
      else if (name == "gamma") gamma = &p;
      else if (name == "omega") omega = &p;
    });
    if (!delta || !alpha || !beta || !gamma || !omega)
      throw ValueError("SeqBoatLayerStreamer: the EMA does not expose delta, alpha, beta, gamma and omega");
    const Index D = ema.config().dim, N = ema.config().ndim, K = ema.config().truncation, RN = D * N;
    const bool same = truncation_ == K && static_cast<Index>(snapshot_.size()) == 4 * RN &&
                      std::equal(delta->data(), delta->data() + RN, snapshot_.data()) &&
                      std::equal(alpha->data(), alpha->data() + RN, snapshot_.data() + RN) &&
                      std::equal(beta->data(), beta->data() + RN, snapshot_.data() + 2 * RN) &&
                      std::equal(gamma->data(), gamma->data() + RN, snapshot_.data() + 3 * RN);
    if (!same) {
      snapshot_.resize(static_cast<std::size_t>(4 * RN));
      std::copy(delta->data(), delta->data() + RN, snapshot_.data());
      std::copy(alpha->data(), alpha->data() + RN, snapshot_.data() + RN);
      std::copy(beta->data(), beta->data() + RN, snapshot_.data() + 2 * RN);
      std::copy(gamma->data(), gamma->data() + RN, snapshot_.data() + 3 * RN);
      const ops::EmaCoeffs<T> cf = ops::ema_coeffs(
          ops::EmaParamsRef<T>{delta->data(), alpha->data(), beta->data(), gamma->data()}, D, N, std::max<Index>(K, 1));
      q_ = cf.q.transpose();
      b_ = cf.b.transpose();
      c_ = cf.c.transpose();
      bqk_ = cf.bqk.transpose();
      truncation_ = K;
    }
    return View{q_.data(), b_.data(), c_.data(), bqk_.data(), omega->data(), D, N, K};
  }

 private:
  std::vector<T> snapshot_;
  Index truncation_ = -1;
  Matrix<T> q_, b_, c_, bqk_;  // (D, N)
};

}  // namespace detail

/// Runs one causal SeqBoatLayer token by token (see the file comment).
///
/// SHAPES   step: x (B, D) -> y (B, D); step_chunk: x (B, C, D) -> y (B, C, D), equal to C calls of step.
///          Row b of every call continues stream b of the state, at that stream's own position.
/// ERRORS   ValueError for a bidirectional layer; ShapeError when x or the state does not fit the layer.
template <class T>
class SeqBoatLayerStreamer {
 public:
  using Scalar = T;
  using State = SeqBoatLayerState<T>;

  explicit SeqBoatLayerStreamer(const SeqBoatLayer<T>& layer) : layer_(&layer) {
    if (layer.config().direction != Direction::causal)
      throw ValueError("SeqBoatLayerStreamer: streaming needs a causal layer (a bidirectional layer looks ahead)");
  }

  const SeqBoatLayer<T>& layer() const { return *layer_; }

  /// A state for `batch` fresh streams.
  State make_state(Index batch) const {
    if (batch < 0) throw ValueError(str_cat("SeqBoatLayerStreamer::make_state: negative batch ", batch));
    const auto& c = layer_->config();
    const Index K = layer_->ssm().config().truncation;
    State st;
    st.ema = zeros<T, 3>({batch, c.embed_dim, c.ndim});
    st.ema_history = zeros<T, 3>({batch, K, c.embed_dim});
    st.keys = zeros<T, 3>({batch, c.window_size, c.zdim});
    st.values = zeros<T, 3>({batch, c.window_size, c.hdim});
    st.key_positions = zeros<std::int64_t, 2>({batch, c.window_size});
    const auto B = static_cast<std::size_t>(batch);
    st.position.assign(B, 0);
    st.activated.assign(B, 0);
    st.last_active.assign(B, 0);
    st.last_gate.assign(B, T(0));
    return st;
  }

  /// Throws ShapeError naming the first field that does not fit this layer (and `batch` rows, when >= 0).
  void check_state(const State& st, Index batch, const std::string& where) const {
    const auto& c = layer_->config();
    const Index B = batch >= 0 ? batch : st.batch();
    const Index K = layer_->ssm().config().truncation;
    check_shape(st.ema, {B, c.embed_dim, c.ndim}, where + ": state.ema (B, D, N)");
    check_shape(st.ema_history, {B, K, c.embed_dim}, where + ": state.ema_history (B, truncation, D)");
    check_shape(st.keys, {B, c.window_size, c.zdim}, where + ": state.keys (B, W, Z)");
    check_shape(st.values, {B, c.window_size, c.hdim}, where + ": state.values (B, W, H)");
    check_shape(st.key_positions, {B, c.window_size}, where + ": state.key_positions (B, W)");
    for (const std::size_t n : {st.position.size(), st.activated.size(), st.last_active.size(), st.last_gate.size()})
      if (static_cast<Index>(n) != B)
        throw ShapeError(str_cat(where, ": the state's per-stream vectors have ", n, " entries, expected B = ", B));
  }

  Tensor2<T> step(const Tensor2<T>& x, State& st, StreamTrace* trace = nullptr) {
    check_shape(x, {-1, layer_->config().embed_dim}, "SeqBoatLayerStreamer::step: x (B, D)");
    const Index B = x.dimension(0), D = x.dimension(1);
    Tensor3<T> x3(B, 1, D);
    std::copy(x.data(), x.data() + x.size(), x3.data());
    const Tensor3<T> y3 = step_chunk(x3, st, trace);
    Tensor2<T> y(B, D);
    std::copy(y3.data(), y3.data() + y3.size(), y.data());
    return y;
  }

  Tensor3<T> step_chunk(const Tensor3<T>& x, State& st, StreamTrace* trace = nullptr);

  // ---- serialisation: safetensors bytes or files ----
  std::vector<std::uint8_t> save_state(const State& st) const {
    io::SafetensorsWriter w;
    check_state(st, -1, "SeqBoatLayerStreamer::save_state");
    write_state(w, "", st);
    w.set_metadata("format", "sma-stream-state-v1");
    w.set_metadata("kind", "seqboat_layer");
    w.set_metadata("scalar", detail::scalar_name<T>());
    w.set_metadata("config", config_json().dump());
    w.set_metadata("params_fingerprint", std::to_string(detail::params_fingerprint(*layer_)));
    return w.to_bytes();
  }
  void save_state_file(const State& st, const std::string& path) const {
    io::write_file_atomic(path, save_state(st));
  }
  State load_state(std::vector<std::uint8_t> bytes, const StreamLoadOptions& opt = {}) const {
    const io::SafetensorsFile f(std::move(bytes), "stream state");
    return load_state(f, opt);
  }
  State load_state_file(const std::string& path, const StreamLoadOptions& opt = {}) const {
    return load_state(io::SafetensorsFile(path), opt);
  }
  State load_state(const io::SafetensorsFile& f, const StreamLoadOptions& opt = {}) const {
    check_header(f, "seqboat_layer", config_json(), opt.require_same_weights ? detail::params_fingerprint(*layer_) : 0,
                 opt.require_same_weights);
    const Index B = f.info("position").shape.empty() ? 0 : f.info("position").shape[0];
    State st = make_state(B);
    read_state(f, "", st);
    return st;
  }

  // ---- building blocks shared with the model streamers ----

  /// What identifies a compatible state: every width and option that shapes or interprets it.
  nlohmann::json config_json() const {
    const auto& c = layer_->config();
    nlohmann::json j;
    j["embed_dim"] = c.embed_dim;
    j["zdim"] = c.zdim;
    j["hdim"] = c.hdim;
    j["ndim"] = c.ndim;
    j["window_size"] = c.window_size;
    j["truncation"] = layer_->ssm().config().truncation;
    j["rel_pos"] = ops::to_string(c.rel_pos);
    j["attention_activation"] = ops::to_string(c.attention_activation);
    j["max_positions"] = c.max_positions;
    j["prenorm"] = c.prenorm;
    j["norm_type"] = to_string(c.norm_type);
    return j;
  }

  void write_state(io::SafetensorsWriter& w, const std::string& prefix, const State& st) const {
    const auto B = static_cast<Index>(st.batch());
    w.add(prefix + "ema", st.ema);
    w.add(prefix + "ema_history", st.ema_history);
    w.add(prefix + "keys", st.keys);
    w.add(prefix + "values", st.values);
    w.add(prefix + "key_positions", st.key_positions);
    w.add(prefix + "position", st.position.data(), {B});
    w.add(prefix + "activated", st.activated.data(), {B});
    w.add(prefix + "last_active", st.last_active.data(), {B});
    w.add(prefix + "last_gate", st.last_gate.data(), {B});
  }

  /// Reads the fields under `prefix` into `st` (already made for the right batch), checking shapes and values.
  void read_state(const io::SafetensorsFile& f, const std::string& prefix, State& st) const {
    const Index B = st.batch();
    auto dims = [](const auto& t) {
      const auto d = dims_of(t);
      return std::vector<Index>(d.begin(), d.end());
    };
    for (const char* n : {"ema", "ema_history", "keys", "values", "last_gate"}) {
      const std::string name = prefix + n;
      if (f.info(name).dtype != io::dtype_of<T>)
        throw ValueError(str_cat("stream state: tensor '", name, "' is ", io::to_string(f.info(name).dtype),
                                 " but this streamer runs in ", detail::scalar_name<T>()));
    }
    f.read_into(prefix + "ema", st.ema.data(), dims(st.ema));
    f.read_into(prefix + "ema_history", st.ema_history.data(), dims(st.ema_history));
    f.read_into(prefix + "keys", st.keys.data(), dims(st.keys));
    f.read_into(prefix + "values", st.values.data(), dims(st.values));
    f.read_into(prefix + "key_positions", st.key_positions.data(), dims(st.key_positions));
    f.read_into(prefix + "position", st.position.data(), {B});
    f.read_into(prefix + "activated", st.activated.data(), {B});
    f.read_into(prefix + "last_active", st.last_active.data(), {B});
    f.read_into(prefix + "last_gate", st.last_gate.data(), {B});
    for (Index b = 0; b < B; ++b) {
      const auto i = static_cast<std::size_t>(b);
      if (st.position[i] < 0 || st.activated[i] < 0 || st.activated[i] > st.position[i])
        throw ValueError(str_cat("stream state: row ", b, " has position ", st.position[i], " and ", st.activated[i],
                                 " activated tokens (need 0 <= activated <= position)"));
    }
  }

  /// Checks format, kind, scalar type, configuration and (when asked) the weights' fingerprint.
  static void check_header(const io::SafetensorsFile& f, const std::string& kind, const nlohmann::json& config,
                           std::uint64_t fingerprint, bool check_fingerprint) {
    auto meta = [&](const char* key) -> std::string {
      if (!f.has_metadata(key)) throw ValueError(str_cat("stream state: metadata '", key, "' is missing"));
      return f.metadata_value(key);
    };
    if (meta("format") != "sma-stream-state-v1")
      throw ValueError(str_cat("stream state: unknown format '", meta("format"), "' (expected sma-stream-state-v1)"));
    if (meta("kind") != kind)
      throw ValueError(str_cat("stream state: it belongs to a '", meta("kind"), "', not a '", kind, "'"));
    if (meta("scalar") != detail::scalar_name<T>())
      throw ValueError(str_cat("stream state: it was saved in ", meta("scalar"), " but this streamer runs in ",
                               detail::scalar_name<T>()));
    const nlohmann::json saved = nlohmann::json::parse(meta("config"));
    for (auto it = config.begin(); it != config.end(); ++it) {
      if (!saved.contains(it.key()))
        throw ValueError(str_cat("stream state: configuration entry '", it.key(), "' is missing"));
      if (saved[it.key()] != it.value())
        throw ValueError(str_cat("stream state: configuration mismatch: ", it.key(), " is ", saved[it.key()].dump(),
                                 " in the state but ", it.value().dump(), " in the model"));
    }
    if (check_fingerprint && meta("params_fingerprint") != std::to_string(fingerprint))
      throw ValueError("stream state: it was made with different weights (parameter fingerprint mismatch); pass "
                       "StreamLoadOptions{false} to load it anyway");
  }

 private:
  const SeqBoatLayer<T>* layer_;
  detail::EmaStepCoefficients<T> ema_coeffs_;
  Context ctx_{Mode::eval};
};

// ---- the causal SeqBoatModel (classifier) ----

/// Streaming state of a SeqBoatModel: one SeqBoatLayerState per layer and the running sum for the mean pooling.
template <class T>
struct SeqBoatModelState {
  std::vector<SeqBoatLayerState<T>> layers;
  Tensor2<T> pooled_sum;               ///< (B, D) sum of the top features over the positions so far
  std::vector<std::int64_t> position;  ///< (B)

  Index batch() const { return static_cast<Index>(position.size()); }
  std::size_t bytes() const {
    std::size_t n = sizeof(T) * static_cast<std::size_t>(pooled_sum.size()) + sizeof(std::int64_t) * position.size();
    for (const auto& l : layers) n += l.bytes();
    return n;
  }
  void reset_row(Index b) {
    for (auto& l : layers) l.reset_row(b);
    detail::zero_tensor_row(pooled_sum, b);
    position.at(static_cast<std::size_t>(b)) = 0;
  }
  void reset() {
    for (Index b = 0; b < batch(); ++b) reset_row(b);
  }
  /// A one-stream state holding a copy of stream b.
  SeqBoatModelState row(Index b) const {
    SeqBoatModelState one;
    for (const auto& l : layers) one.layers.push_back(l.row(b));
    one.pooled_sum = Tensor2<T>(1, pooled_sum.dimension(1));
    detail::copy_tensor_row(pooled_sum, b, one.pooled_sum, 0);
    one.position.assign(1, position.at(static_cast<std::size_t>(b)));
    return one;
  }
  /// Stream b <- stream src_b of `src` (a state of the same model; ShapeError otherwise).
  void set_row(Index b, const SeqBoatModelState& src, Index src_b = 0) {
    if (src.layers.size() != layers.size() || src.pooled_sum.dimension(1) != pooled_sum.dimension(1))
      throw ShapeError(str_cat("SeqBoatModelState::set_row: the source has ", src.layers.size(), " layers of width ",
                               src.pooled_sum.dimension(1), ", this state ", layers.size(), " of width ",
                               pooled_sum.dimension(1)));
    for (std::size_t i = 0; i < layers.size(); ++i) layers[i].set_row(b, src.layers[i], src_b);
    detail::copy_tensor_row(src.pooled_sum, src_b, pooled_sum, b);
    position.at(static_cast<std::size_t>(b)) = src.position.at(static_cast<std::size_t>(src_b));
  }
};

/// Runs a causal SeqBoatModel token by token. step_chunk(x (B, C, d_input)) -> (B, C, d_output): entry (b, c) is the
/// model's output for stream b's prefix up to that token (the decoder applied to the mean of the top features so
/// far); after the last token of a sequence it equals SeqBoatModel::forward on the whole sequence.
template <class T>
class SeqBoatModelStreamer {
 public:
  using State = SeqBoatModelState<T>;

  explicit SeqBoatModelStreamer(const SeqBoatModel<T>& model) : model_(&model) {
    if (model.config().bidirectional)
      throw ValueError("SeqBoatModelStreamer: streaming needs a causal model (bidirectional = false)");
    for (Index i = 0; i < model.layers().size(); ++i) layers_.emplace_back(model.layers()[i]);
  }

  State make_state(Index batch) const {
    State st;
    for (const auto& l : layers_) st.layers.push_back(l.make_state(batch));
    st.pooled_sum = zeros<T, 2>({batch, model_->config().d_model});
    st.position.assign(static_cast<std::size_t>(batch), 0);
    return st;
  }

  /// `layer_outputs`, when given, receives each layer's output (B, C, D).
  Tensor3<T> step_chunk(const Tensor3<T>& x, State& st, std::vector<Tensor3<T>>* layer_outputs = nullptr,
                        std::vector<StreamTrace>* traces = nullptr) {
    const auto& cfg = model_->config();
    check_shape(x, {-1, -1, cfg.d_input}, "SeqBoatModelStreamer::step_chunk: x (B, C, d_input)");
    const Index B = x.dimension(0), C = x.dimension(1), D = cfg.d_model;
    if (st.layers.size() != layers_.size() || st.batch() != B)
      throw ShapeError(str_cat("SeqBoatModelStreamer::step_chunk: the state has ", st.layers.size(), " layers and ",
                               st.batch(), " streams; the model has ", layers_.size(), " layers and x has ", B, " rows"));
    check_shape(st.pooled_sum, {B, D}, "SeqBoatModelStreamer::step_chunk: state.pooled_sum (B, D)");
    for (std::size_t i = 0; i < layers_.size(); ++i)
      layers_[i].check_state(st.layers[i], B, str_cat("SeqBoatModelStreamer::step_chunk: layer ", i));
    Tensor3<T> h(B, C, D);
    as_matrix(h) = model_->encoder().forward_rows(as_matrix(x));
    if (layer_outputs) layer_outputs->clear();
    if (traces) traces->assign(layers_.size(), StreamTrace{});
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      h = layers_[i].step_chunk(h, st.layers[i], traces ? &(*traces)[i] : nullptr);
      if (layer_outputs) layer_outputs->push_back(h);
    }
    if (cfg.prenorm) {
      typename SequenceNorm<T>::Cache nc;
      h = model_->final_norm().forward(ctx_, h, nc);
    }
    Matrix<T> pooled(B * C, D);  // (B*C, D) prefix means
    for (Index b = 0; b < B; ++b) {
      auto sum = as_matrix(st.pooled_sum).row(b);
      auto& pos = st.position[static_cast<std::size_t>(b)];
      for (Index c = 0; c < C; ++c) {
        sum += as_matrix(h).row(b * C + c);
        ++pos;
        pooled.row(b * C + c) = sum / T(pos);
      }
    }
    Tensor3<T> logits(B, C, cfg.d_output);
    as_matrix(logits) = model_->decoder().forward_rows(pooled);
    return logits;
  }

  Tensor2<T> step(const Tensor2<T>& x, State& st) {
    const Index B = x.dimension(0);
    Tensor3<T> x3(B, 1, x.dimension(1));
    std::copy(x.data(), x.data() + x.size(), x3.data());
    const Tensor3<T> y = step_chunk(x3, st);
    Tensor2<T> out(B, y.dimension(2));
    std::copy(y.data(), y.data() + y.size(), out.data());
    return out;
  }

  std::vector<std::uint8_t> save_state(const State& st) const {
    io::SafetensorsWriter w;
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].write_state(w, str_cat("layers.", i, "."), st.layers[i]);
    w.add("pooled_sum", st.pooled_sum);
    w.add("position", st.position.data(), {st.batch()});
    w.set_metadata("format", "sma-stream-state-v1");
    w.set_metadata("kind", "seqboat_model");
    w.set_metadata("scalar", detail::scalar_name<T>());
    w.set_metadata("config", config_json().dump());
    w.set_metadata("params_fingerprint", std::to_string(detail::params_fingerprint(*model_)));
    return w.to_bytes();
  }
  void save_state_file(const State& st, const std::string& path) const { io::write_file_atomic(path, save_state(st)); }
  State load_state_file(const std::string& path, const StreamLoadOptions& opt = {}) const {
    return load_state(io::SafetensorsFile(path), opt);
  }
  State load_state(std::vector<std::uint8_t> bytes, const StreamLoadOptions& opt = {}) const {
    return load_state(io::SafetensorsFile(std::move(bytes), "stream state"), opt);
  }
  State load_state(const io::SafetensorsFile& f, const StreamLoadOptions& opt = {}) const {
    SeqBoatLayerStreamer<T>::check_header(f, "seqboat_model", config_json(),
                                          opt.require_same_weights ? detail::params_fingerprint(*model_) : 0,
                                          opt.require_same_weights);
    const Index B = f.info("position").shape.empty() ? 0 : f.info("position").shape[0];
    State st = make_state(B);
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].read_state(f, str_cat("layers.", i, "."), st.layers[i]);
    f.read_into("pooled_sum", st.pooled_sum.data(), {B, model_->config().d_model});
    f.read_into("position", st.position.data(), {B});
    return st;
  }

  nlohmann::json config_json() const {
    nlohmann::json j;
    j["layers"] = static_cast<Index>(layers_.size());
    j["layer"] = layers_.empty() ? nlohmann::json() : layers_[0].config_json();
    j["d_input"] = model_->config().d_input;
    j["d_output"] = model_->config().d_output;
    return j;
  }

 private:
  const SeqBoatModel<T>* model_;
  std::vector<SeqBoatLayerStreamer<T>> layers_;
  Context ctx_{Mode::eval};
};

// ---- implementation ----

template <class T>
void SeqBoatLayerState<T>::reset_row(Index b) {
  if (b < 0 || b >= batch()) throw ValueError(str_cat("SeqBoatLayerState::reset_row: row ", b, " of ", batch()));
  detail::zero_tensor_row(ema, b);
  detail::zero_tensor_row(ema_history, b);
  detail::zero_tensor_row(keys, b);
  detail::zero_tensor_row(values, b);
  detail::zero_tensor_row(key_positions, b);
  const auto i = static_cast<std::size_t>(b);
  position[i] = 0;
  activated[i] = 0;
  last_active[i] = 0;
  last_gate[i] = T(0);
}

template <class T>
SeqBoatLayerState<T> SeqBoatLayerState<T>::row(Index b) const {
  if (b < 0 || b >= batch()) throw ValueError(str_cat("SeqBoatLayerState::row: row ", b, " of ", batch()));
  SeqBoatLayerState one;
  one.ema = Tensor3<T>(1, ema.dimension(1), ema.dimension(2));
  one.ema_history = Tensor3<T>(1, ema_history.dimension(1), ema_history.dimension(2));
  one.keys = Tensor3<T>(1, keys.dimension(1), keys.dimension(2));
  one.values = Tensor3<T>(1, values.dimension(1), values.dimension(2));
  one.key_positions = Tensor2<std::int64_t>(1, key_positions.dimension(1));
  one.position.assign(1, 0);
  one.activated.assign(1, 0);
  one.last_active.assign(1, 0);
  one.last_gate.assign(1, T(0));
  one.set_row(0, *this, b);
  return one;
}

template <class T>
void SeqBoatLayerState<T>::set_row(Index b, const SeqBoatLayerState& src, Index src_b) {
  if (b < 0 || b >= batch()) throw ValueError(str_cat("SeqBoatLayerState::set_row: row ", b, " of ", batch()));
  if (src_b < 0 || src_b >= src.batch())
    throw ValueError(str_cat("SeqBoatLayerState::set_row: source row ", src_b, " of ", src.batch()));
  detail::check_trailing_dims(ema, src.ema, "ema");
  detail::check_trailing_dims(ema_history, src.ema_history, "ema_history");
  detail::check_trailing_dims(keys, src.keys, "keys");
  detail::check_trailing_dims(values, src.values, "values");
  detail::check_trailing_dims(key_positions, src.key_positions, "key_positions");
  detail::copy_tensor_row(src.ema, src_b, ema, b);
  detail::copy_tensor_row(src.ema_history, src_b, ema_history, b);
  detail::copy_tensor_row(src.keys, src_b, keys, b);
  detail::copy_tensor_row(src.values, src_b, values, b);
  detail::copy_tensor_row(src.key_positions, src_b, key_positions, b);
  const auto i = static_cast<std::size_t>(b), j = static_cast<std::size_t>(src_b);
  position[i] = src.position[j];
  activated[i] = src.activated[j];
  last_active[i] = src.last_active[j];
  last_gate[i] = src.last_gate[j];
}

template <class T>
Tensor3<T> SeqBoatLayerStreamer<T>::step_chunk(const Tensor3<T>& x, State& st, StreamTrace* trace) {
  const SeqBoatLayer<T>& L = *layer_;
  const auto& cfg = L.config();
  const Index D = cfg.embed_dim, Z = cfg.zdim, H = cfg.hdim, W = cfg.window_size;
  check_shape(x, {-1, -1, D}, "SeqBoatLayerStreamer::step_chunk: x (B, C, D)");
  const Index B = x.dimension(0), C = x.dimension(1), NT = B * C;
  check_state(st, B, "SeqBoatLayerStreamer::step_chunk");
  const auto& gau = L.gau();
  const ops::LocalAttentionConfig& acfg = gau.config().attention;
  if (acfg.window != W || gau.config().zdim != Z || gau.config().hdim != H)
    throw ValueError("SeqBoatLayerStreamer: the GAU's window/zdim/hdim differ from the layer's configuration");
  const auto ema = ema_coeffs_.get(L.ssm());
  const Index N = ema.order, K = ema.truncation;
  if (st.ema_history.dimension(1) != K)
    throw ShapeError(str_cat("SeqBoatLayerStreamer::step_chunk: the state keeps ", st.ema_history.dimension(1),
                             " EMA inputs but the layer's truncation is now ", K, "; make a new state"));
  if (C == 0) return Tensor3<T>(B, 0, D);

  // 1. Norm, then the EMA recurrence, per stream at its own position.
  Tensor3<T> xn_store;
  if (cfg.prenorm) {
    typename SequenceNorm<T>::Cache nc;
    xn_store = L.norm().forward(ctx_, x, nc);
  }
  const Tensor3<T>& xin = cfg.prenorm ? xn_store : x;
  Tensor3<T> e = uninitialized<T, 3>({B, C, D});  // (B, C, D) EMA output before silu
#pragma omp parallel for schedule(static) if (B > 1 && B * C * D * N > (1 << 16))
  for (Index b = 0; b < B; ++b) {
    const std::int64_t pos0 = st.position[static_cast<std::size_t>(b)];
    T* s_row = st.ema.data() + b * D * N;
    for (Index c = 0; c < C; ++c) {
      const T* xt = xin.data() + (b * C + c) * D;
      T* yt = e.data() + (b * C + c) * D;
      const std::int64_t pos = pos0 + c;
      // With truncation, the input that leaves the window (position - K) is subtracted with weight b q^K.
      const bool drop = K > 0 && pos >= K;
      T* hist = K > 0 ? st.ema_history.data() + (b * K + pos % K) * D : nullptr;
      for (Index d = 0; d < D; ++d) {
        T acc = ema.omega[d] * xt[d];
        const T xo = drop ? hist[d] : T(0);
        T* s = s_row + d * N;
        const T *q = ema.q + d * N, *bb = ema.b + d * N, *cc = ema.c + d * N, *bqk = ema.bqk + d * N;
        for (Index n = 0; n < N; ++n) {
          s[n] = q[n] * s[n] + bb[n] * xt[d] - (drop ? bqk[n] * xo : T(0));
          acc += cc[n] * s[n];
        }
        yt[d] = acc;
        if (hist) hist[d] = xt[d];
      }
    }
  }

  // 2. mx = silu(ema), hx_proj, router (the same calls as SeqBoatLayer::forward, on B*C rows).
  const Matrix<T> mx = silu(as_matrix(e));            // (NT, D)
  Matrix<T> hu = L.hx_proj().forward_rows(cmap(mx));  // (NT, 2+D)
  Matrix<T> u = hu.leftCols(SeqBoatLayer<T>::kOptions);
  if (cfg.router_shift != 0) {
    u.col(1).array() += T(cfg.router_shift / 2);
    u.col(0).array() -= T(cfg.router_shift / 2);
  }
  typename LatentConfigurator<T>::Cache rc;
  L.router().forward(ctx_, cmap(u), B, C, rc);
  Matrix<T> sum = hu.rightCols(D);  // hx, then + gate * h

  // 3. Activated tokens: the GAU's projections on all of them at once, then one query each, in order per stream.
  std::vector<Index> tok;                           // flat token index b*C + c of each activated token
  std::vector<Index> row_begin(static_cast<std::size_t>(B) + 1, 0);
  for (Index b = 0; b < B; ++b) {
    for (Index c = 0; c < C; ++c)
      if (rc.active(b, c)) tok.push_back(b * C + c);
    row_begin[static_cast<std::size_t>(b) + 1] = static_cast<Index>(tok.size());
  }
  const Index S = static_cast<Index>(tok.size());
  if (S > 0) {
    Matrix<T> xa(S, D);
    for (Index s = 0; s < S; ++s) xa.row(s) = mx.row(tok[static_cast<std::size_t>(s)]);
    const Matrix<T> base = gau.mx_proj().forward_rows(cmap(xa));  // (S, Z+2H)
    const Matrix<T> act = silu(cmap(base));
    const auto g = gau.gamma().mat();
    const auto bt = gau.beta().mat();
    Matrix<T> q = (act.leftCols(Z).array().rowwise() * g.row(0).array()).rowwise() + bt.row(0).array();
    Matrix<T> k = (act.leftCols(Z).array().rowwise() * g.row(1).array()).rowwise() + bt.row(1).array();
    const Matrix<T> v = act.rightCols(H);
    Matrix<T> att(S, H);
    const T* table = gau.has_bias_table() ? gau.rel_pos_bias().data() : nullptr;
#pragma omp parallel for schedule(dynamic, 1) if (B > 1 && S * W * (Z + H) > (1 << 18))
    for (Index b = 0; b < B; ++b) {
      std::vector<T> scratch(static_cast<std::size_t>(W) + 1);
      std::vector<std::int64_t> ordinals(static_cast<std::size_t>(W));
      const auto bi = static_cast<std::size_t>(b);
      std::int64_t& n_act = st.activated[bi];
      for (Index s = row_begin[bi]; s < row_begin[bi + 1]; ++s) {
        const Index c = tok[static_cast<std::size_t>(s)] - b * C;
        const std::int64_t pos = st.position[bi] + c;
        ops::attention_step_prepare(acfg, q.row(s).data(), k.row(s).data(), Z, pos);
        ops::AttentionStepMemory<T> mem;
        mem.n = static_cast<Index>(std::min<std::int64_t>(n_act, W));
        mem.keys = st.keys.data() + b * W * Z;
        mem.values = st.values.data() + b * W * H;
        mem.positions = st.key_positions.data() + b * W;
        if (acfg.position == ops::PositionEncoding::local_simple) {
          // Ring slot j holds the most recent ordinal o < n_act with o = j (mod W).
          for (Index j = 0; j < mem.n; ++j) ordinals[static_cast<std::size_t>(j)] = n_act - 1 - ((n_act - 1 - j) % W);
          mem.ordinals = ordinals.data();
        }
        ops::attention_step(acfg, q.row(s).data(), Z, H, pos, n_act, k.row(s).data(), v.row(s).data(), mem, table,
                            scratch.data(), att.row(s).data());
        const Index slot = static_cast<Index>(n_act % W);
        std::copy(k.row(s).data(), k.row(s).data() + Z, st.keys.data() + (b * W + slot) * Z);
        std::copy(v.row(s).data(), v.row(s).data() + H, st.values.data() + (b * W + slot) * H);
        st.key_positions(b, slot) = pos;
        ++n_act;
      }
    }
    const Matrix<T> hr = att.cwiseProduct(act.middleCols(Z, H));
    const Matrix<T> hc = gau.h_proj().forward_rows(cmap(hr));  // (S, D)
    for (Index s = 0; s < S; ++s) {
      const Index t = tok[static_cast<std::size_t>(s)];
      sum.row(t) += rc.gate[static_cast<std::size_t>(t)] * hc.row(s);
    }
  }

  // 4. out = silu(hx + h + residual), then the post-norm.
  Matrix<T> pre = sum + as_matrix(x);
  Tensor3<T> out(B, C, D);
  as_matrix(out) = silu(cmap(pre));
  for (Index b = 0; b < B; ++b) {
    const auto bi = static_cast<std::size_t>(b);
    st.position[bi] += C;
    st.last_active[bi] = rc.active(b, C - 1);
    st.last_gate[bi] = rc.gate[static_cast<std::size_t>(b * C + C - 1)];
  }
  if (trace) {
    trace->active = rc.active;
    trace->gate = Tensor2<double>(B, C);
    for (Index i = 0; i < NT; ++i) trace->gate.data()[i] = double(rc.gate[static_cast<std::size_t>(i)]);
  }
  if (!cfg.prenorm) {
    typename SequenceNorm<T>::Cache nc;
    return L.norm().forward(ctx_, out, nc);
  }
  return out;
}

}  // namespace sma
