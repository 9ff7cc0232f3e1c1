// sma/models/lm.hpp: a causal SeqBoat language model (the official fairseq `slag_lm`: token embedding scaled by
// sqrt(D), SeqBoat layers each followed by a normalised feed-forward block, a final norm with pre-norm, and the output
// projection tied to the embedding), its training pass (next-token cross-entropy, hand-written backward), checkpoints,
// streaming decode with a fixed-size state per stream, and sampling (greedy, temperature, top-k; seeded).
//
// NAMES    decoder.embed_tokens.weight (V, D); decoder.layers.<i>.slag_layer.* (a SeqBoatLayer: norm.norm.*, ssm.*,
//          hx_proj.*, q_router.temp, mx_proj.*, h_proj.*, gamma, beta, rel_pos_bias.rel_pos_bias);
//          decoder.layers.<i>.nffn.* (Ffn: norm.norm.*, fc1.*, fc2.*); decoder.final_norm.norm.* (pre-norm only).
//          fairseq's SeqBoatUnit calls its EMA `move` where the standalone layer (and sma) say `ssm`; the tied output
//          projection has no tensor of its own (a fairseq `decoder.output_projection.weight` is ignored on load).
// SHAPES   tokens (B, L) int32 in [0, V) -> logits (B, L, V). ctx.padding (B, L), 1 = pad, as in fairseq: padded
//          embeddings and final features are zeroed, and the layers honour the mask.
// GRADIENTS backward(dlogits) adds into every parameter's gradient (the embedding gets both the input and the
//          output-projection parts).
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/error.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/io/safetensors.hpp>
#include <sma/io/state_dict.hpp>
#include <sma/layers/activation.hpp>
#include <sma/layers/ffn.hpp>
#include <sma/layers/norm.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/models/seqboat_stream.hpp>
#include <sma/optim/loss.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace sma {

/// The LM's hyper-parameters; comments give the fairseq argument each one mirrors.
struct SeqBoatLmConfig {
  Index vocab_size = 0;        ///< len(dictionary)
  Index embed_dim = 512;       ///< decoder_embed_dim (D)
  Index hidden_dim = 1024;     ///< decoder_hidden_dim (H, the GAU's value width)
  Index zdim = 128;            ///< decoder_z_dim (Z)
  Index ndim = 16;             ///< decoder_n_dim (N, EMA order)
  Index ffn_hidden_dim = 1024; ///< decoder_ffn_embed_dim; 0 = no feed-forward blocks
  Index layers = 6;            ///< decoder_layers
  Index window_size = 256;     ///< decoder_chunk_size: the working memory W of the local attention
  Index truncation = 0;        ///< truncation_length of the EMA (0 = none)
  Index max_positions = 1024;  ///< max_target_positions: reach of the simple position bias
  ops::AttentionActivation attention_activation = ops::AttentionActivation::softmax;  ///< attention_activation_fn
  ops::PositionEncoding rel_pos = ops::PositionEncoding::simple;                      ///< rel_pos_bias
  NormType norm_type = NormType::layernorm;  ///< normalization_type
  bool prenorm = true;                       ///< normalize_before
  bool scale_embedding = true;               ///< not no_scale_embedding: embeddings times sqrt(D)
  Activation activation = Activation::silu;  ///< activation_fn of the feed-forward blocks
  double dropout = 0.0, attention_dropout = 0.0, hidden_dropout = 0.0, activation_dropout = 0.0;
  double init_temp_scale = 0.3;              ///< init_temp_scale (the LM's default)
  /// per_row (default here): every sequence is routed on its own, so training batches, evaluation and streaming all
  /// compute the same function. `reference` reproduces the official batch-wide uncompressed fallback.
  RoutingSemantics routing = RoutingSemantics::per_row;
  double router_shift = 0.0;  ///< see SeqBoatLayerConfig::router_shift

  void validate() const {
    if (vocab_size < 1) throw ValueError(str_cat("SeqBoatLm: vocab_size must be >= 1, got ", vocab_size));
    if (layers < 0) throw ValueError(str_cat("SeqBoatLm: layers must be >= 0, got ", layers));
    if (ffn_hidden_dim < 0) throw ValueError(str_cat("SeqBoatLm: ffn_hidden_dim must be >= 0, got ", ffn_hidden_dim));
    layer_config().validate();
  }

  SeqBoatLayerConfig layer_config() const {
    SeqBoatLayerConfig c;
    c.embed_dim = embed_dim;
    c.zdim = zdim;
    c.hdim = hidden_dim;
    c.ndim = ndim;
    c.dropout = dropout;
    c.attention_dropout = attention_dropout;
    c.hidden_dropout = hidden_dropout;
    c.attention_activation = attention_activation;
    c.direction = Direction::causal;
    c.window_size = window_size;
    c.truncation = truncation;
    c.norm_type = norm_type;
    c.prenorm = prenorm;
    c.rel_pos = rel_pos;
    c.max_positions = max_positions;
    c.init_temp_scale = init_temp_scale;
    c.routing = routing;
    c.router_shift = router_shift;
    return c;
  }

  nlohmann::json to_json() const {
    nlohmann::json j;
    j["vocab_size"] = vocab_size;
    j["embed_dim"] = embed_dim;
    j["hidden_dim"] = hidden_dim;
    j["zdim"] = zdim;
    j["ndim"] = ndim;
    j["ffn_hidden_dim"] = ffn_hidden_dim;
    j["layers"] = layers;
    j["window_size"] = window_size;
    j["truncation"] = truncation;
    j["max_positions"] = max_positions;
    j["attention_activation"] = ops::to_string(attention_activation);
    j["rel_pos"] = ops::to_string(rel_pos);
    j["norm_type"] = to_string(norm_type);
    j["prenorm"] = prenorm;
    j["scale_embedding"] = scale_embedding;
    j["activation"] = to_string(activation);
    j["dropout"] = dropout;
    j["attention_dropout"] = attention_dropout;
    j["hidden_dropout"] = hidden_dropout;
    j["activation_dropout"] = activation_dropout;
    j["init_temp_scale"] = init_temp_scale;
    j["routing"] = routing == RoutingSemantics::per_row ? "per_row" : "reference";
    j["router_shift"] = router_shift;
    return j;
  }

  /// Every key is optional (defaults above) except vocab_size; unknown keys are a ValueError (a typo would otherwise
  /// silently build another model).
  static SeqBoatLmConfig from_json(const nlohmann::json& j) {
    SeqBoatLmConfig c;
    static const char* known[] = {"vocab_size", "embed_dim", "hidden_dim", "zdim", "ndim", "ffn_hidden_dim", "layers",
                                  "window_size", "truncation", "max_positions", "attention_activation", "rel_pos",
                                  "norm_type", "prenorm", "scale_embedding", "activation", "dropout",
                                  "attention_dropout", "hidden_dropout", "activation_dropout", "init_temp_scale",
                                  "routing", "router_shift"};
    for (auto it = j.begin(); it != j.end(); ++it)
      if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return it.key() == k; }) ==
          std::end(known))
        throw ValueError(str_cat("SeqBoatLmConfig: unknown key '", it.key(), "'"));
    auto idx = [&](const char* k, Index& v) {
      if (j.contains(k)) v = j[k].get<Index>();
    };
    auto dbl = [&](const char* k, double& v) {
      if (j.contains(k)) v = j[k].get<double>();
    };
    auto bln = [&](const char* k, bool& v) {
      if (j.contains(k)) v = j[k].get<bool>();
    };
    if (!j.contains("vocab_size")) throw ValueError("SeqBoatLmConfig: 'vocab_size' is missing");
    idx("vocab_size", c.vocab_size);
    idx("embed_dim", c.embed_dim);
    idx("hidden_dim", c.hidden_dim);
    idx("zdim", c.zdim);
    idx("ndim", c.ndim);
    idx("ffn_hidden_dim", c.ffn_hidden_dim);
    idx("layers", c.layers);
    idx("window_size", c.window_size);
    idx("truncation", c.truncation);
    idx("max_positions", c.max_positions);
    if (j.contains("attention_activation"))
      c.attention_activation = ops::parse_attention_activation(j["attention_activation"].get<std::string>());
    if (j.contains("rel_pos")) c.rel_pos = ops::parse_position_encoding(j["rel_pos"].get<std::string>());
    if (j.contains("norm_type")) c.norm_type = parse_norm_type(j["norm_type"].get<std::string>());
    bln("prenorm", c.prenorm);
    bln("scale_embedding", c.scale_embedding);
    if (j.contains("activation")) c.activation = parse_activation(j["activation"].get<std::string>());
    dbl("dropout", c.dropout);
    dbl("attention_dropout", c.attention_dropout);
    dbl("hidden_dropout", c.hidden_dropout);
    dbl("activation_dropout", c.activation_dropout);
    dbl("init_temp_scale", c.init_temp_scale);
    if (j.contains("routing")) c.routing = parse_routing_semantics(j["routing"].get<std::string>());
    dbl("router_shift", c.router_shift);
    c.validate();
    return c;
  }
};

/// The causal SeqBoat language model (see the file comment).
template <class T>
class SeqBoatLm {
 public:
  using Scalar = T;
  using Config = SeqBoatLmConfig;
  using Layer = SeqBoatLayer<T>;
  using Block = Ffn<T>;

  struct Cache {
    Tensor2<std::int32_t> tokens;                      ///< (B, L)
    std::vector<typename Layer::Cache> layers;
    std::vector<typename Block::Cache> ffns;
    typename SequenceNorm<T>::Cache final_norm;
    Tensor3<T> top;                                    ///< (B, L, D) features that meet the output projection
    Mask padding;                                      ///< (B, L) when has_padding
    bool has_padding = false;
  };

  SeqBoatLm() = default;
  explicit SeqBoatLm(Config cfg, std::uint64_t seed = 0)
      : cfg_((cfg.validate(), cfg)), embed_("weight", {cfg.vocab_size, cfg.embed_dim}) {
    std::mt19937_64 rng(seed);
    for (Index i = 0; i < cfg_.layers; ++i) {
      layers_.emplace_back(cfg_.layer_config(), rng());
      if (cfg_.ffn_hidden_dim > 0) ffns_.emplace_back(ffn_config(), rng());
    }
    if (cfg_.prenorm)
      final_norm_ = SequenceNorm<T>(typename SequenceNorm<T>::Config{cfg_.norm_type, cfg_.embed_dim, 1e-5, true});
    // fairseq's Embedding: N(0, D^-1/2).
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(cfg_.embed_dim)));
    std::mt19937_64 erng(rng());
    for (Index i = 0; i < embed_.size(); ++i) embed_.data()[i] = static_cast<T>(nd(erng));
  }

  const Config& config() const { return cfg_; }
  T embed_scale() const { return cfg_.scale_embedding ? static_cast<T>(std::sqrt(double(cfg_.embed_dim))) : T(1); }
  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  bool has_ffn() const { return !ffns_.empty(); }
  const Param<T>& embedding() const { return embed_; }
  Param<T>& embedding() { return embed_; }
  const Layer& layer(Index i) const { return layers_.at(static_cast<std::size_t>(i)); }
  Layer& layer(Index i) { return layers_.at(static_cast<std::size_t>(i)); }
  const Block& ffn(Index i) const { return ffns_.at(static_cast<std::size_t>(i)); }
  Block& ffn(Index i) { return ffns_.at(static_cast<std::size_t>(i)); }
  const SequenceNorm<T>& final_norm() const { return final_norm_; }

  template <class V>
  void visit_params(V&& v) {
    v("decoder.embed_tokens.weight", embed_);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      visit_child(v, str_cat("decoder.layers.", i, ".slag_layer."), layers_[i]);
      if (!ffns_.empty()) visit_child(v, str_cat("decoder.layers.", i, ".nffn."), ffns_[i]);
    }
    if (cfg_.prenorm) visit_child(v, "decoder.final_norm.", final_norm_);
  }

  /// tokens (B, L) -> logits (B, L, V).
  Tensor3<T> forward(Context& ctx, const Tensor2<std::int32_t>& tokens, Cache& c) const {
    const Index B = tokens.dimension(0), L = tokens.dimension(1), V = cfg_.vocab_size;
    const Mask* pad = ctx.padding_for(B, L, "SeqBoatLm::forward");
    check_tokens(tokens, "SeqBoatLm::forward");
    c.tokens = tokens;
    c.has_padding = pad != nullptr;
    if (pad) c.padding = *pad;
    Tensor3<T> h = embed(tokens, pad);
    c.layers.resize(layers_.size());
    c.ffns.resize(ffns_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      h = layers_[i].forward(ctx, h, c.layers[i]);
      if (!ffns_.empty()) h = ffns_[i].forward(ctx, h, c.ffns[i]);
    }
    c.top = cfg_.prenorm ? final_norm_.forward(ctx, h, c.final_norm) : std::move(h);
    if (pad) zero_rows(*pad, c.top);
    Tensor3<T> logits = uninitialized<T, 3>({B, L, V});
    as_matrix(logits).noalias() = as_matrix(c.top) * embed_.mat().transpose();
    return logits;
  }

  /// dlogits (B, L, V) -> adds every parameter's gradient.
  void backward(Context& ctx, const Tensor3<T>& dlogits, const Cache& c) {
    const Index B = c.tokens.dimension(0), L = c.tokens.dimension(1), D = cfg_.embed_dim, V = cfg_.vocab_size;
    check_shape(dlogits, {B, L, V}, "SeqBoatLm::backward: dlogits (B, L, V)");
    const Mask* pad = c.has_padding ? &c.padding : nullptr;
    embed_.grad_mat().noalias() += as_matrix(dlogits).transpose() * as_matrix(c.top);
    Tensor3<T> dh(B, L, D);
    as_matrix(dh).noalias() = as_matrix(dlogits) * embed_.mat();
    if (pad) zero_rows(*pad, dh);
    if (cfg_.prenorm) dh = final_norm_.backward(ctx, dh, c.final_norm);
    for (std::size_t i = layers_.size(); i-- > 0;) {
      if (!ffns_.empty()) dh = ffns_[i].backward(ctx, dh, c.ffns[i]);
      dh = layers_[i].backward(ctx, dh, c.layers[i]);
    }
    const T scale = embed_scale();
    auto dE = embed_.grad_mat();
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) {
        if (is_padding(pad, b, t)) continue;
        dE.row(c.tokens(b, t)) += scale * as_matrix(dh).row(b * L + t);
      }
  }

  /// Mean next-token cross-entropy over targets (B*L, -100 = ignored) and, when `backward`, its gradient added into
  /// the parameters.
  optim::LossResult loss(Context& ctx, const Tensor2<std::int32_t>& tokens, const std::vector<std::int64_t>& targets,
                         Cache& c, bool with_backward = true) {
    const Tensor3<T> logits = forward(ctx, tokens, c);
    Tensor3<T> dlogits(logits.dimensions());
    Matrix<T> dl;
    const optim::LossResult r = optim::cross_entropy<T>(as_matrix(logits), targets, with_backward ? &dl : nullptr);
    if (with_backward) {
      as_matrix(dlogits) = dl;
      backward(ctx, dlogits, c);
    }
    return r;
  }

  /// Throws ValueError naming the first token outside [0, V).
  void check_tokens(const Tensor2<std::int32_t>& tokens, const char* where) const {
    for (Index i = 0; i < tokens.size(); ++i)
      if (tokens.data()[i] < 0 || tokens.data()[i] >= cfg_.vocab_size)
        throw ValueError(str_cat(where, ": token ", tokens.data()[i], " at flat index ", i, " is outside [0, ",
                                 cfg_.vocab_size, ")"));
  }

  /// scale * E[tokens] (B, L, D), zero at padded positions.
  Tensor3<T> embed(const Tensor2<std::int32_t>& tokens, const Mask* pad) const {
    const Index B = tokens.dimension(0), L = tokens.dimension(1), D = cfg_.embed_dim;
    Tensor3<T> h(B, L, D);
    const T scale = embed_scale();
    const auto E = embed_.mat();
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t)
        as_matrix(h).row(b * L + t) = is_padding(pad, b, t) ? Matrix<T>::Zero(1, D) : Matrix<T>(scale * E.row(tokens(b, t)));
    return h;
  }

 private:
  typename Ffn<T>::Config ffn_config() const {
    typename Ffn<T>::Config f;
    f.dim = cfg_.embed_dim;
    f.hidden = cfg_.ffn_hidden_dim;
    f.activation = cfg_.activation;
    f.prenorm = cfg_.prenorm;
    f.norm_type = cfg_.norm_type;
    f.dropout = cfg_.dropout;
    f.hidden_dropout = cfg_.activation_dropout;
    return f;
  }
  static void zero_rows(const Mask& pad, Tensor3<T>& t) {
    const Index L = t.dimension(1);
    for (Index b = 0; b < t.dimension(0); ++b)
      for (Index s = 0; s < L; ++s)
        if (pad(b, s)) as_matrix(t).row(b * L + s).setZero();
  }

  Config cfg_;
  Param<T> embed_;
  std::vector<Layer> layers_;
  std::vector<Block> ffns_;
  SequenceNorm<T> final_norm_;
};

// ---- checkpoints ----

/// Writes the model's parameters under their names, its configuration (metadata "sma_lm_config") and `metadata`
/// (e.g. "vocab": the symbols of a character vocabulary), atomically.
template <class T>
void save_lm_checkpoint(SeqBoatLm<T>& lm, const std::string& path,
                        const std::map<std::string, std::string>& metadata = {}) {
  io::SafetensorsWriter w;
  io::add_state_dict(lm, w);
  for (const auto& kv : metadata) w.set_metadata(kv.first, kv.second);
  w.set_metadata("format", "sma-lm-v1");
  w.set_metadata("sma_lm_config", lm.config().to_json().dump());
  w.save(path);
}

template <class T>
struct LmCheckpoint {
  SeqBoatLm<T> model;
  std::map<std::string, std::string> metadata;
};

/// Builds the model from the file's configuration and loads every parameter strictly. The configuration comes from
/// the metadata "sma_lm_config" (save_lm_checkpoint) or "model_config" (sma::train checkpoints, e.g. sma-demo's
/// kjv-lm run), else from `config` (e.g. an imported fairseq state_dict). Ignored tensors: a tied
/// `decoder.output_projection.weight`, fairseq's `decoder.version`, and a training checkpoint's optimizer.* and
/// trainer.* state.
template <class T>
LmCheckpoint<T> load_lm_checkpoint(const std::string& path, const SeqBoatLmConfig* config = nullptr) {
  const io::SafetensorsFile f(path);
  SeqBoatLmConfig cfg;
  if (f.has_metadata("sma_lm_config"))
    cfg = SeqBoatLmConfig::from_json(nlohmann::json::parse(f.metadata_value("sma_lm_config")));
  else if (f.has_metadata("model_config"))
    cfg = SeqBoatLmConfig::from_json(nlohmann::json::parse(f.metadata_value("model_config")));
  else if (config)
    cfg = *config;
  else
    throw ValueError(str_cat(path, ": no 'sma_lm_config' or 'model_config' metadata; pass the model's configuration"));
  LmCheckpoint<T> ck{SeqBoatLm<T>(cfg), f.metadata()};
  io::LoadOptions lo;
  lo.ignore = [](const std::string& n) {
    return n == "decoder.output_projection.weight" || n == "decoder.version" || n.rfind("optimizer.", 0) == 0 ||
           n.rfind("trainer.", 0) == 0;
  };
  io::load_state_dict(ck.model, f, lo);
  return ck;
}

// ---- streaming decode ----

/// Streaming state of a SeqBoatLm: one SeqBoatLayerState per layer (fixed size; see seqboat_stream.hpp).
template <class T>
struct SeqBoatLmState {
  std::vector<SeqBoatLayerState<T>> layers;
  std::vector<std::int64_t> position;  ///< (B) tokens consumed

  Index batch() const { return static_cast<Index>(position.size()); }
  std::size_t bytes() const {
    std::size_t n = sizeof(std::int64_t) * position.size();
    for (const auto& l : layers) n += l.bytes();
    return n;
  }
  void reset_row(Index b) {
    for (auto& l : layers) l.reset_row(b);
    position.at(static_cast<std::size_t>(b)) = 0;
  }
  void reset() {
    for (Index b = 0; b < batch(); ++b) reset_row(b);
  }
  /// A one-stream state holding a copy of stream b.
  SeqBoatLmState row(Index b) const {
    SeqBoatLmState one;
    for (const auto& l : layers) one.layers.push_back(l.row(b));
    one.position.assign(1, position.at(static_cast<std::size_t>(b)));
    return one;
  }
  /// Stream b <- stream src_b of `src` (a state of the same model; ShapeError otherwise).
  void set_row(Index b, const SeqBoatLmState& src, Index src_b = 0) {
    if (src.layers.size() != layers.size())
      throw ShapeError(str_cat("SeqBoatLmState::set_row: the source has ", src.layers.size(), " layers, this state ",
                               layers.size()));
    for (std::size_t i = 0; i < layers.size(); ++i) layers[i].set_row(b, src.layers[i], src_b);
    position.at(static_cast<std::size_t>(b)) = src.position.at(static_cast<std::size_t>(src_b));
  }
};

/// Decodes a SeqBoatLm token by token for B independent streams. Keeps a pointer to the model (which must outlive it)
/// and per-layer derived constants: one streamer per thread.
template <class T>
class SeqBoatLmStreamer {
 public:
  using State = SeqBoatLmState<T>;

  explicit SeqBoatLmStreamer(const SeqBoatLm<T>& lm) : lm_(&lm) {
    for (Index i = 0; i < lm.num_layers(); ++i) layers_.emplace_back(lm.layer(i));
  }

  const SeqBoatLm<T>& model() const { return *lm_; }

  State make_state(Index batch) const {
    State st;
    for (const auto& l : layers_) st.layers.push_back(l.make_state(batch));
    st.position.assign(static_cast<std::size_t>(batch), 0);
    return st;
  }

  /// tokens (B, C) -> logits (B, C, V): entry (b, c) predicts stream b's token after that one. Equal to C calls of
  /// step, and to SeqBoatLm::forward on each whole stream.
  Tensor3<T> step_chunk(const Tensor2<std::int32_t>& tokens, State& st) {
    const Index B = tokens.dimension(0), C = tokens.dimension(1), V = lm_->config().vocab_size;
    if (st.batch() != B || st.layers.size() != layers_.size())
      throw ShapeError(str_cat("SeqBoatLmStreamer: the state has ", st.batch(), " streams and ", st.layers.size(),
                               " layers; tokens have ", B, " rows and the model ", layers_.size(), " layers"));
    for (std::size_t i = 0; i < layers_.size(); ++i)
      layers_[i].check_state(st.layers[i], B, str_cat("SeqBoatLmStreamer: layer ", i));
    lm_->check_tokens(tokens, "SeqBoatLmStreamer::step_chunk");
    Tensor3<T> h = lm_->embed(tokens, nullptr);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      h = layers_[i].step_chunk(h, st.layers[i]);
      if (lm_->has_ffn()) {
        typename Ffn<T>::Cache fc;
        h = lm_->ffn(static_cast<Index>(i)).forward(ctx_, h, fc);
      }
    }
    if (lm_->config().prenorm) {
      typename SequenceNorm<T>::Cache nc;
      h = lm_->final_norm().forward(ctx_, h, nc);
    }
    for (auto& p : st.position) p += C;
    Tensor3<T> logits = uninitialized<T, 3>({B, C, V});
    as_matrix(logits).noalias() = as_matrix(h) * lm_->embedding().mat().transpose();
    return logits;
  }

  /// One token per stream: tokens (B) -> logits (B, V).
  Tensor2<T> step(const std::vector<std::int32_t>& tokens, State& st) {
    Tensor2<std::int32_t> t(static_cast<Index>(tokens.size()), 1);
    std::copy(tokens.begin(), tokens.end(), t.data());
    const Tensor3<T> y = step_chunk(t, st);
    Tensor2<T> out(y.dimension(0), y.dimension(2));
    std::copy(y.data(), y.data() + y.size(), out.data());
    return out;
  }

  std::vector<std::uint8_t> save_state(const State& st) const {
    io::SafetensorsWriter w;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      layers_[i].check_state(st.layers[i], st.batch(), str_cat("SeqBoatLmStreamer::save_state: layer ", i));
      layers_[i].write_state(w, str_cat("layers.", i, "."), st.layers[i]);
    }
    w.add("position", st.position.data(), {st.batch()});
    w.set_metadata("format", "sma-stream-state-v1");
    w.set_metadata("kind", "seqboat_lm");
    w.set_metadata("scalar", detail::scalar_name<T>());
    w.set_metadata("config", lm_->config().to_json().dump());
    w.set_metadata("params_fingerprint", std::to_string(detail::params_fingerprint(*lm_)));
    return w.to_bytes();
  }
  void save_state_file(const State& st, const std::string& path) const { io::write_file_atomic(path, save_state(st)); }

  State load_state(std::vector<std::uint8_t> bytes, const StreamLoadOptions& opt = {}) const {
    return load_state(io::SafetensorsFile(std::move(bytes), "stream state"), opt);
  }
  State load_state_file(const std::string& path, const StreamLoadOptions& opt = {}) const {
    return load_state(io::SafetensorsFile(path), opt);
  }
  State load_state(const io::SafetensorsFile& f, const StreamLoadOptions& opt = {}) const {
    SeqBoatLayerStreamer<T>::check_header(f, "seqboat_lm", lm_->config().to_json(),
                                          opt.require_same_weights ? detail::params_fingerprint(*lm_) : 0,
                                          opt.require_same_weights);
    const Index B = f.info("position").shape.empty() ? 0 : f.info("position").shape[0];
    State st = make_state(B);
    for (std::size_t i = 0; i < layers_.size(); ++i) layers_[i].read_state(f, str_cat("layers.", i, "."), st.layers[i]);
    f.read_into("position", st.position.data(), {B});
    for (Index b = 0; b < B; ++b)
      for (std::size_t i = 0; i < layers_.size(); ++i)
        if (st.layers[i].position[static_cast<std::size_t>(b)] != st.position[static_cast<std::size_t>(b)])
          throw ValueError(str_cat("stream state: stream ", b, " is at position ", st.position[static_cast<std::size_t>(b)],
                                   " but its layer ", i, " at ", st.layers[i].position[static_cast<std::size_t>(b)]));
    return st;
  }

 private:
  const SeqBoatLm<T>* lm_;
  std::vector<SeqBoatLayerStreamer<T>> layers_;
  Context ctx_{Mode::eval};
};

// ---- sampling ----

/// How the next token is chosen from the logits.
struct SamplingOptions {
  double temperature = 1.0;  ///< 0 = greedy (argmax; ties go to the lowest id); else softmax(logits / temperature)
  Index top_k = 0;           ///< keep the k most likely tokens (0 = all)
  std::uint64_t seed = 0;    ///< the generator's seed (generate / generate_batch)

  void validate() const {
    if (!(temperature >= 0) || !std::isfinite(temperature))
      throw ValueError(str_cat("SamplingOptions: temperature must be finite and >= 0, got ", temperature));
    if (top_k < 0) throw ValueError(str_cat("SamplingOptions: top_k must be >= 0, got ", top_k));
  }
};

/// Picks a token from `logits` (V entries). Uses `rng` only when sampling (temperature > 0). Deterministic for a seed:
/// the uniform draw is formed from the generator's 53 high bits, not a library distribution.
template <class T>
std::int32_t sample_token(const T* logits, Index V, const SamplingOptions& opt, std::mt19937_64& rng) {
  opt.validate();
  if (V < 1) throw ValueError("sample_token: empty vocabulary");
  for (Index i = 0; i < V; ++i)
    if (!std::isfinite(double(logits[i])))
      throw NumericError(str_cat("sample_token: logit ", i, " is ", double(logits[i])));
  if (opt.temperature == 0 || opt.top_k == 1) {
    Index best = 0;
    for (Index i = 1; i < V; ++i)
      if (logits[i] > logits[best]) best = i;
    return static_cast<std::int32_t>(best);
  }
  std::vector<Index> ids(static_cast<std::size_t>(V));
  for (Index i = 0; i < V; ++i) ids[static_cast<std::size_t>(i)] = i;
  Index keep = V;
  if (opt.top_k > 0 && opt.top_k < V) {
    keep = opt.top_k;
    // The k largest, ties broken by the lower id, in descending order.
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), [&](Index a, Index b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
  }
  double mx = -INFINITY;
  for (Index j = 0; j < keep; ++j) mx = std::max(mx, double(logits[ids[static_cast<std::size_t>(j)]]));
  std::vector<double> p(static_cast<std::size_t>(keep));
  double sum = 0;
  for (Index j = 0; j < keep; ++j) {
    p[static_cast<std::size_t>(j)] = std::exp((double(logits[ids[static_cast<std::size_t>(j)]]) - mx) / opt.temperature);
    sum += p[static_cast<std::size_t>(j)];
  }
  const double u = double(rng() >> 11) * (1.0 / 9007199254740992.0) * sum;  // [0, sum)
  double acc = 0;
  for (Index j = 0; j < keep; ++j) {
    acc += p[static_cast<std::size_t>(j)];
    if (u < acc) return static_cast<std::int32_t>(ids[static_cast<std::size_t>(j)]);
  }
  return static_cast<std::int32_t>(ids[static_cast<std::size_t>(keep - 1)]);
}

/// Batched generation: stream b continues with prompts[b] (lengths may differ) and gets n new tokens. All streams
/// step together; a stream whose prompt is shorter starts sampling earlier. Stream b samples with its own generator
/// seeded opt.seed + b.
/// STATE  Every stream's state ends having consumed its prompt and its new tokens EXCEPT the last one (the last token
///        of prompt + output when n = 0): a sampled token only enters the model when the next one is wanted. To go on
///        later, pass that last token first: generate(..., {out.back(), further tokens...}, ...). Nothing is computed
///        twice and nothing is computed in vain.
template <class T>
std::vector<std::vector<std::int32_t>> generate_batch(SeqBoatLmStreamer<T>& streamer, SeqBoatLmState<T>& st,
                                                      const std::vector<std::vector<std::int32_t>>& prompts, Index n,
                                                      const SamplingOptions& opt) {
  opt.validate();
  const Index B = static_cast<Index>(prompts.size());
  if (st.batch() != B)
    throw ShapeError(str_cat("generate: ", B, " prompts for a state of ", st.batch(), " streams"));
  if (n < 0) throw ValueError(str_cat("generate: negative count ", n));
  Index longest = 0;
  for (Index b = 0; b < B; ++b) {
    if (prompts[static_cast<std::size_t>(b)].empty())
      throw ValueError(str_cat("generate: prompt ", b, " is empty (the model needs a first token)"));
    longest = std::max<Index>(longest, static_cast<Index>(prompts[static_cast<std::size_t>(b)].size()));
  }
  const Index V = streamer.model().config().vocab_size;
  std::vector<std::mt19937_64> rngs;
  for (Index b = 0; b < B; ++b) rngs.emplace_back(opt.seed + static_cast<std::uint64_t>(b));
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(B));
  if (n == 0) {
    // Consume each prompt but its last token, each stream its own length: one stream at a time.
    for (Index b = 0; b < B; ++b) {
      const auto& p = prompts[static_cast<std::size_t>(b)];
      if (p.size() < 2) continue;
      SeqBoatLmState<T> one = st.row(b);
      Tensor2<std::int32_t> t(1, static_cast<Index>(p.size()) - 1);
      std::copy(p.begin(), p.end() - 1, t.data());
      streamer.step_chunk(t, one);
      st.set_row(b, one);
    }
    return out;
  }
  // Stream b feeds prompt[b][t] while t < len_b, then its own samples; it samples from step len_b - 1 on and is done
  // at step len_b + n - 2. A stream done before the last step keeps a copy of its state from that moment.
  const Index steps = longest + n - 1;
  std::vector<std::int32_t> next(static_cast<std::size_t>(B));
  std::vector<SeqBoatLmState<T>> finished(static_cast<std::size_t>(B));
  for (Index t = 0; t < steps; ++t) {
    for (Index b = 0; b < B; ++b) {
      const auto& p = prompts[static_cast<std::size_t>(b)];
      const auto& o = out[static_cast<std::size_t>(b)];
      next[static_cast<std::size_t>(b)] = t < static_cast<Index>(p.size()) ? p[static_cast<std::size_t>(t)] : o.back();
    }
    const Tensor2<T> logits = streamer.step(next, st);
    for (Index b = 0; b < B; ++b) {
      const auto bi = static_cast<std::size_t>(b);
      const Index len = static_cast<Index>(prompts[bi].size());
      if (t < len - 1 || static_cast<Index>(out[bi].size()) == n) continue;
      out[bi].push_back(sample_token(logits.data() + b * V, V, opt, rngs[bi]));
      if (static_cast<Index>(out[bi].size()) == n && t + 1 < steps) finished[bi] = st.row(b);
    }
  }
  for (Index b = 0; b < B; ++b)
    if (finished[static_cast<std::size_t>(b)].batch() == 1) st.set_row(b, finished[static_cast<std::size_t>(b)]);
  return out;
}

/// Continues stream `st` (a one-stream state) with `prompt` (at least one token) and returns `n` new tokens. The state
/// ends having consumed everything but the last returned token (see generate_batch): continue with
/// generate(streamer, st, {out.back(), ...}, ...).
template <class T>
std::vector<std::int32_t> generate(SeqBoatLmStreamer<T>& streamer, SeqBoatLmState<T>& st,
                                   const std::vector<std::int32_t>& prompt, Index n, const SamplingOptions& opt) {
  return generate_batch(streamer, st, std::vector<std::vector<std::int32_t>>{prompt}, n, opt).at(0);
}

}  // namespace sma
