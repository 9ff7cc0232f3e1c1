// sma/models/seqboat.hpp: SeqBoatLayer and the SeqBoatModel classifier, mirroring the official dataflow
// (standalone_seqboat.py). Named classes with named members, because the dataflow is not a chain: hx_proj feeds
// both the router and the residual branch.
#pragma once

#include <sma/compose/stack.hpp>
#include <sma/core/context.hpp>
#include <sma/core/layer.hpp>
#include <sma/layers/activation.hpp>
#include <sma/layers/dropout.hpp>
#include <sma/layers/ema.hpp>
#include <sma/layers/gau.hpp>
#include <sma/layers/linear.hpp>
#include <sma/layers/norm.hpp>
#include <sma/layers/router.hpp>
#include <sma/ops/compress.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sma {

/// Everything a SeqBoatLayer is built from; field names follow the reference's constructor arguments.
struct SeqBoatLayerConfig {
  Index embed_dim = 0;  ///< D
  Index zdim = 0;       ///< Z
  Index hdim = 0;       ///< H
  Index ndim = 16;      ///< N, EMA order
  double dropout = 0.0, attention_dropout = 0.0, hidden_dropout = 0.0;
  ops::AttentionActivation attention_activation = ops::AttentionActivation::relu2;
  Direction direction = Direction::causal;
  Index window_size = 256;  ///< W, single-sided working-memory size in compressed slots
  Index truncation = 0;     ///< EMA kernel truncation, 0 = none
  NormType norm_type = NormType::layernorm;
  bool prenorm = true;
  bool norm_affine = true;
  ops::PositionEncoding rel_pos = ops::PositionEncoding::simple;
  Index max_positions = 1024;
  double init_temp_scale = 1.0;
  RoutingSemantics routing = RoutingSemantics::reference;
  EmaAlgo ema_algo = EmaAlgo::automatic;
  /// Added to the "activate" router logit and subtracted from the "skip" one (half each), before the softmax.
  /// 0 in normal use; benchmarks and the demo's dense baseline steer the activation density with it (a large
  /// positive value activates every token), as the reference benchmark script does with hx_proj.bias.
  double router_shift = 0.0;

  /// The reference's keyword arguments as JSON (the golden files' `config`), e.g.
  /// {"embed_dim":16,"zdim":8,"hdim":32,"ndim":2,"bidirectional":true,"rel_pos_bias":"simple","local_pos":false,...}.
  static SeqBoatLayerConfig from_reference_json(const nlohmann::json& j) {
    SeqBoatLayerConfig c;
    auto get_index = [&](const char* k, Index dflt) {
      return j.contains(k) && !j[k].is_null() ? j[k].get<Index>() : dflt;
    };
    auto get_double = [&](const char* k, double dflt) { return j.contains(k) && !j[k].is_null() ? j[k].get<double>() : dflt; };
    auto get_bool = [&](const char* k, bool dflt) { return j.contains(k) && !j[k].is_null() ? j[k].get<bool>() : dflt; };
    auto get_string = [&](const char* k, const char* dflt) {
      return j.contains(k) && !j[k].is_null() ? j[k].get<std::string>() : std::string(dflt);
    };
    c.embed_dim = get_index("embed_dim", 0);
    c.zdim = get_index("zdim", 0);
    c.hdim = get_index("hdim", 0);
    c.ndim = get_index("ndim", 2);
    c.dropout = get_double("dropout", 0.0);
    c.attention_dropout = get_double("attention_dropout", 0.0);
    c.hidden_dropout = get_double("hidden_dropout", 0.0);
    c.attention_activation = ops::parse_attention_activation(get_string("attention_activation", "relu2"));
    c.direction = get_bool("bidirectional", false) ? Direction::bidirectional : Direction::causal;
    c.window_size = get_index("window_size", 256);
    c.truncation = get_index("truncation", 0);
    c.norm_type = parse_norm_type(get_string("norm_type", "layernorm"));
    c.prenorm = get_bool("prenorm", true);
    c.norm_affine = get_bool("norm_affine", true);
    const std::string rp = get_string("rel_pos_bias", "simple");
    if (rp == "simple")
      c.rel_pos = get_bool("local_pos", false) ? ops::PositionEncoding::local_simple : ops::PositionEncoding::simple;
    else if (rp == "rotary")
      c.rel_pos = ops::PositionEncoding::rotary;
    else
      throw ValueError(str_cat("SeqBoatLayerConfig: unknown rel_pos_bias '", rp, "' (expected 'simple' or 'rotary')"));
    c.max_positions = get_index("max_positions", 1024);
    c.init_temp_scale = get_double("init_temp_scale", 1.0);
    return c;
  }

  void validate() const {
    auto positive = [](Index v, const char* name) {
      if (v < 1) throw ValueError(str_cat("SeqBoatLayer: ", name, " must be >= 1, got ", v));
    };
    positive(embed_dim, "embed_dim");
    positive(zdim, "zdim");
    positive(hdim, "hdim");
    positive(ndim, "ndim");
    positive(window_size, "window_size");
    positive(max_positions, "max_positions");
    if (truncation < 0) throw ValueError(str_cat("SeqBoatLayer: truncation must be >= 0 (0 = none), got ", truncation));
    for (double p : {dropout, attention_dropout, hidden_dropout})
      if (!(p >= 0 && p < 1)) throw ValueError(str_cat("SeqBoatLayer: dropout rates must be in [0, 1), got ", p));
  }
};

/// One SeqBoat layer (ARCHITECTURE.md section 1; the paper's Figure 2).
///
/// SHAPES   x (B, L, D) -> (B, L, D). Padding from ctx.padding (B, L), 1 = pad; outputs at padded positions are
///          computed but meaningless (as in the reference); outputs at real tokens never depend on padded inputs.
/// PARAMS   norm.norm.*, ssm.{delta,alpha,beta,gamma,omega}, hx_proj.{weight,bias} (2+D, D), q_router.temp (1),
///          and the GAU's mx_proj.*, h_proj.*, gamma, beta, rel_pos_bias.rel_pos_bias: the reference's names.
/// DATAFLOW residual = x; x = norm(x) if prenorm; mx = silu(ema(x)); [u, hx] = hx_proj(mx);
///          probs = router(u); the activated tokens of mx are compressed, run through the GAU, extracted and
///          scaled by the gate; out = silu(hx + h + residual); out = norm(out) if post-norm.
/// GRADIENTS backward returns dx and adds to every parameter's gradient; the router learns through the gate.
/// INSPECTION last-forward quantities (density, compressed length, activation mask) are in the Cache.
template <class T>
class SeqBoatLayer {
 public:
  using Scalar = T;
  using Config = SeqBoatLayerConfig;
  static constexpr Index kInDim = Dynamic, kOutDim = Dynamic;
  static constexpr Index kOptions = 2;

  struct Cache {
    typename SequenceNorm<T>::Cache norm;
    typename MultiHeadEma<T>::Cache ssm;
    Tensor3<T> norm_io;        ///< (B, L, D): norm output (pre-norm) or norm input (post-norm)
    Tensor3<T> ema_out;        ///< (B, L, D) EMA output before silu
    Matrix<T> mx;              ///< (N, D) silu(ema_out) after dropout, N = B*L
    Matrix<T> mx_mask;         ///< dropout scale on mx (empty: none)
    Matrix<T> hu;              ///< (N, 2+D) hx_proj output: router logits then hx
    Matrix<T> u;               ///< (N, 2) router logits
    typename LatentConfigurator<T>::Cache router;
    Compression comp;
    typename Gau<T>::Cache gau;
    Matrix<T> hc;              ///< (S, D) GAU output (after the bidirectional dropout)
    Matrix<T> hc_mask;         ///< dropout scale on hc (empty: none)
    Matrix<T> sum_mask;        ///< causal: dropout scale on hx + h (empty: none)
    Tensor3<T> pre;            ///< (B, L, D) argument of the final silu
    Index batch = 0, length = 0;

    /// Activated tokens / non-padded tokens of the last forward.
    double density(const Mask* padding = nullptr) const {
      Index on = 0, real = 0;
      for (Index b = 0; b < batch; ++b)
        for (Index t = 0; t < length; ++t) {
          if (is_padding(padding, b, t)) continue;
          ++real;
          on += router.active(b, t);
        }
      return real ? double(on) / double(real) : 0.0;
    }
  };

  SeqBoatLayer() = default;
  explicit SeqBoatLayer(Config cfg, std::uint64_t seed = 0) : cfg_((cfg.validate(), cfg)) {
    norm_ = SequenceNorm<T>(typename SequenceNorm<T>::Config{cfg_.norm_type, cfg_.embed_dim, 1e-5, cfg_.norm_affine});
    typename MultiHeadEma<T>::Config ec;
    ec.dim = cfg_.embed_dim;
    ec.ndim = cfg_.ndim;
    ec.direction = cfg_.direction;
    ec.truncation = cfg_.truncation;
    ec.algo = cfg_.ema_algo;
    ssm_ = MultiHeadEma<T>(ec);
    hx_proj_ = Linear<T>(typename Linear<T>::Config{cfg_.embed_dim, kOptions + cfg_.embed_dim, true});
    q_router_ = LatentConfigurator<T>(typename LatentConfigurator<T>::Config{cfg_.embed_dim, kOptions, cfg_.init_temp_scale});
    typename Gau<T>::Config gc;
    gc.dim = cfg_.embed_dim;
    gc.zdim = cfg_.zdim;
    gc.hdim = cfg_.hdim;
    gc.attention.window = cfg_.window_size;
    gc.attention.direction = cfg_.direction;
    gc.attention.activation = cfg_.attention_activation;
    gc.attention.position = cfg_.rel_pos;
    gc.attention.max_positions = cfg_.max_positions;
    gc.hidden_dropout = cfg_.hidden_dropout;
    gc.attention_dropout = cfg_.attention_dropout;
    gau_ = Gau<T>(gc);
    reset_parameters(seed);
  }

  const Config& config() const { return cfg_; }
  Config& config() { return cfg_; }

  /// The reference's initialisation, seeded.
  void reset_parameters(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    ssm_.reset_parameters(rng());
    hx_proj_.reset_parameters(rng());
    gau_.reset_parameters(rng());
    q_router_.reset_parameters();
  }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "norm.", norm_);
    visit_child(v, "ssm.", ssm_);
    visit_child(v, "hx_proj.", hx_proj_);
    visit_child(v, "q_router.", q_router_);
    gau_.visit_params(v);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& c) const {
    check_shape(x, {-1, -1, cfg_.embed_dim}, "SeqBoatLayer::forward: x (B, L, D)");
    if (ctx.check_finite) check_finite(x, "SeqBoatLayer::forward: x");
    const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.embed_dim, N = B * L;
    (void)ctx.padding_for(B, L, "SeqBoatLayer::forward");
    c.batch = B;
    c.length = L;
    const Tensor3<T>* xin = &x;
    if (cfg_.prenorm) {
      c.norm_io = norm_.forward(ctx, x, c.norm);
      xin = &c.norm_io;
    }
    c.ema_out = ssm_.forward(ctx, *xin, c.ssm);
    c.mx = silu(as_matrix(c.ema_out));
    dropout_inplace(ctx, cfg_.dropout, c.mx, c.mx_mask);
    c.hu = hx_proj_.forward_rows(cmap(c.mx));
    c.u = c.hu.leftCols(kOptions);
    if (cfg_.router_shift != 0) {
      c.u.col(1).array() += T(cfg_.router_shift / 2);
      c.u.col(0).array() -= T(cfg_.router_shift / 2);
    }
    q_router_.forward(ctx, cmap(c.u), B, L, c.router);
    c.comp = plan_compression(c.router.active, cfg_.routing);

    Matrix<T> sum = c.hu.rightCols(D);  // hx, then + h
    c.hc.resize(0, D);
    c.hc_mask.resize(0, 0);
    if (!c.comp.empty()) {
      const Matrix<T> xc = compress<T>(cmap(c.mx), c.comp);
      c.hc = gau_.forward(ctx, cmap(xc), c.comp, c.gau);
      if (cfg_.direction == Direction::bidirectional) {
        dropout_inplace(ctx, cfg_.dropout, c.hc, c.hc_mask);
      }
      extract_add<T>(cmap(c.hc), c.comp, c.router.gate.data(), map(sum));
    }
    c.sum_mask.resize(0, 0);
    if (cfg_.direction == Direction::causal) {
      dropout_inplace(ctx, cfg_.dropout, sum, c.sum_mask);
    }
    c.pre = Tensor3<T>(B, L, D);
    as_matrix(c.pre) = sum + as_matrix(x);
    Tensor3<T> out(B, L, D);
    as_matrix(out) = silu(as_matrix(c.pre));
    if (!cfg_.prenorm) {
      c.norm_io = out;
      return norm_.forward(ctx, c.norm_io, c.norm);
    }
    return out;
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& c) {
    const Index B = c.batch, L = c.length, D = cfg_.embed_dim, N = B * L;
    check_shape(dy, {B, L, D}, "SeqBoatLayer::backward: dy");
    Tensor3<T> dpre(B, L, D);
    if (!cfg_.prenorm) {
      const Tensor3<T> dact = norm_.backward(ctx, dy, c.norm);
      as_matrix(dpre) = silu_backward(as_matrix(c.pre), as_matrix(dact));
    } else {
      as_matrix(dpre) = silu_backward(as_matrix(c.pre), as_matrix(dy));
    }
    Matrix<T> dsum = as_matrix(dpre);  // gradient of hx + h (before the causal dropout)
    dropout_backward_inplace(c.sum_mask, dsum);

    Matrix<T> dmx = Matrix<T>::Zero(N, D);
    std::vector<T> dgate(static_cast<std::size_t>(N), T(0));
    if (!c.comp.empty()) {
      Matrix<T> dhc;
      extract_backward<T>(cmap(c.hc), c.comp, c.router.gate.data(), cmap(dsum), dhc, dgate.data());
      dropout_backward_inplace(c.hc_mask, dhc);
      const Matrix<T> dxc = gau_.backward(ctx, cmap(dhc), c.comp, c.gau);
      compress_backward<T>(cmap(dxc), c.comp, map(dmx));
    }
    Matrix<T> dhu(N, kOptions + D);
    dhu.leftCols(kOptions) = q_router_.backward(cmap(c.u), dgate, c.router);
    dhu.rightCols(D) = dsum;
    dmx += hx_proj_.backward_rows(cmap(c.mx), cmap(dhu));
    dropout_backward_inplace(c.mx_mask, dmx);
    Tensor3<T> de(B, L, D);
    as_matrix(de) = silu_backward(as_matrix(c.ema_out), cmap(dmx));
    Tensor3<T> dx = ssm_.backward(ctx, de, c.ssm);
    if (cfg_.prenorm) dx = norm_.backward(ctx, dx, c.norm);
    as_matrix(dx) += as_matrix(dpre);  // the residual
    return dx;
  }

  SequenceNorm<T>& norm() { return norm_; }
  MultiHeadEma<T>& ssm() { return ssm_; }
  Linear<T>& hx_proj() { return hx_proj_; }
  LatentConfigurator<T>& router() { return q_router_; }
  Gau<T>& gau() { return gau_; }
  // Read-only access to the sub-layers (streaming decode runs them token by token).
  const SequenceNorm<T>& norm() const { return norm_; }
  const MultiHeadEma<T>& ssm() const { return ssm_; }
  const Linear<T>& hx_proj() const { return hx_proj_; }
  const LatentConfigurator<T>& router() const { return q_router_; }
  const Gau<T>& gau() const { return gau_; }

 private:
  Config cfg_;
  SequenceNorm<T> norm_;
  MultiHeadEma<T> ssm_;
  Linear<T> hx_proj_;
  LatentConfigurator<T> q_router_;
  Gau<T> gau_;
};

}  // namespace sma

namespace sma {

/// The reference classifier's arguments (SeqBoatModel in standalone_seqboat.py), same names and defaults.
struct SeqBoatModelConfig {
  Index d_input = 1;
  Index d_output = 10;
  Index d_model = 512;
  Index n_layers = 6;
  double dropout = 0.1;
  bool prenorm = false;
  Index max_positions = 1024;
  Index d_qk = 96;
  Index d_ema = 16;
  Index mem_size = 128;
  bool bidirectional = true;
  double init_temp_scale = 1.0;
  NormType norm_type = NormType::batchnorm;
  ops::PositionEncoding rel_pos = ops::PositionEncoding::simple;
  ops::AttentionActivation attention_activation = ops::AttentionActivation::relu2;
  RoutingSemantics routing = RoutingSemantics::reference;
  EmaAlgo ema_algo = EmaAlgo::automatic;
  double router_shift = 0.0;  ///< see SeqBoatLayerConfig::router_shift

  /// The configuration of each layer: zdim = d_qk, hdim = 2 d_model, ndim = d_ema, window = mem_size.
  SeqBoatLayerConfig layer_config() const {
    SeqBoatLayerConfig c;
    c.embed_dim = d_model;
    c.zdim = d_qk;
    c.hdim = 2 * d_model;
    c.ndim = d_ema;
    c.dropout = dropout;
    c.attention_activation = attention_activation;
    c.direction = bidirectional ? Direction::bidirectional : Direction::causal;
    c.window_size = mem_size;
    c.norm_type = norm_type;
    c.prenorm = prenorm;
    c.rel_pos = rel_pos;
    c.max_positions = max_positions;
    c.init_temp_scale = init_temp_scale;
    c.routing = routing;
    c.ema_algo = ema_algo;
    c.router_shift = router_shift;
    return c;
  }

  static SeqBoatModelConfig from_reference_json(const nlohmann::json& j) {
    SeqBoatModelConfig c;
    auto has = [&](const char* k) { return j.contains(k) && !j[k].is_null(); };
    if (has("d_input")) c.d_input = j["d_input"].get<Index>();
    if (has("d_output")) c.d_output = j["d_output"].get<Index>();
    if (has("d_model")) c.d_model = j["d_model"].get<Index>();
    if (has("n_layers")) c.n_layers = j["n_layers"].get<Index>();
    if (has("dropout")) c.dropout = j["dropout"].get<double>();
    if (has("prenorm")) c.prenorm = j["prenorm"].get<bool>();
    if (has("max_positions")) c.max_positions = j["max_positions"].get<Index>();
    if (has("d_qk")) c.d_qk = j["d_qk"].get<Index>();
    if (has("d_ema")) c.d_ema = j["d_ema"].get<Index>();
    if (has("mem_size")) c.mem_size = j["mem_size"].get<Index>();
    if (has("bidirectional")) c.bidirectional = j["bidirectional"].get<bool>();
    if (has("init_temp_scale")) c.init_temp_scale = j["init_temp_scale"].get<double>();
    if (has("norm_type")) c.norm_type = parse_norm_type(j["norm_type"].get<std::string>());
    if (has("attention_activation"))
      c.attention_activation = ops::parse_attention_activation(j["attention_activation"].get<std::string>());
    if (has("rel_pos_bias")) {
      const auto rp = j["rel_pos_bias"].get<std::string>();
      if (rp == "simple")
        c.rel_pos = ops::PositionEncoding::simple;
      else if (rp == "rotary")
        c.rel_pos = ops::PositionEncoding::rotary;
      else
        throw ValueError(str_cat("SeqBoatModelConfig: unknown rel_pos_bias '", rp, "'"));
    }
    return c;
  }
};

/// The reference's sequence classifier: encoder Linear(d_input -> D), n_layers SeqBoatLayers, final norm (pre-norm
/// only), mean over positions, decoder Linear(D -> d_output).
///
/// SHAPES   x (B, L, d_input) -> logits (B, d_output). With ctx.padding the mean runs over real tokens only (the
///          reference has no padding mask here; without one the two agree).
/// PARAMS   encoder.*, seq_layers.<i>.*, final_norm.norm.* (pre-norm only), decoder.*: the reference's names.
template <class T>
class SeqBoatModel {
 public:
  using Scalar = T;
  using Config = SeqBoatModelConfig;
  using Layer = SeqBoatLayer<T>;

  struct Cache {
    Tensor3<T> x;                          ///< (B, L, d_input)
    typename Stack<Layer>::Cache layers;
    typename SequenceNorm<T>::Cache final_norm;
    Tensor3<T> top;                        ///< (B, L, D) input of the pooling
    Matrix<T> pooled;                      ///< (B, D)
    std::vector<Index> counts;             ///< real tokens per row
  };

  SeqBoatModel() = default;
  explicit SeqBoatModel(Config cfg, std::uint64_t seed = 0)
      : cfg_(cfg),
        encoder_(typename Linear<T>::Config{cfg.d_input, cfg.d_model, true}),
        layers_(cfg.n_layers, [&](Index i) { return Layer(cfg.layer_config(), seed + 1000 + std::uint64_t(i)); }),
        decoder_(typename Linear<T>::Config{cfg.d_model, cfg.d_output, true}) {
    if (cfg.prenorm)
      final_norm_ = SequenceNorm<T>(typename SequenceNorm<T>::Config{cfg.norm_type, cfg.d_model, 1e-5, true});
    std::mt19937_64 rng(seed);
    encoder_.reset_parameters(rng());
    decoder_.reset_parameters(rng());
  }

  const Config& config() const { return cfg_; }
  Stack<Layer>& layers() { return layers_; }
  const Stack<Layer>& layers() const { return layers_; }
  // Read-only access to the other sub-layers (streaming decode). final_norm() is meaningful only with prenorm.
  const Linear<T>& encoder() const { return encoder_; }
  const SequenceNorm<T>& final_norm() const { return final_norm_; }
  const Linear<T>& decoder() const { return decoder_; }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "encoder.", encoder_);
    visit_child(v, "seq_layers.", layers_);
    if (cfg_.prenorm) visit_child(v, "final_norm.", final_norm_);
    visit_child(v, "decoder.", decoder_);
  }

  Tensor2<T> forward(Context& ctx, const Tensor3<T>& x, Cache& c) const {
    check_shape(x, {-1, -1, cfg_.d_input}, "SeqBoatModel::forward: x (B, L, d_input)");
    const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.d_model;
    const Mask* pad = ctx.padding_for(B, L, "SeqBoatModel::forward");
    c.x = x;
    Tensor3<T> h(B, L, D);
    as_matrix(h) = encoder_.forward_rows(as_matrix(x));
    h = layers_.forward(ctx, h, c.layers);
    c.top = cfg_.prenorm ? final_norm_.forward(ctx, h, c.final_norm) : std::move(h);
    c.pooled = Matrix<T>::Zero(B, D);
    c.counts.assign(static_cast<std::size_t>(B), 0);
    for (Index b = 0; b < B; ++b) {
      for (Index t = 0; t < L; ++t) {
        if (is_padding(pad, b, t)) continue;
        c.pooled.row(b) += as_matrix(c.top).row(b * L + t);
        ++c.counts[static_cast<std::size_t>(b)];
      }
      if (c.counts[static_cast<std::size_t>(b)] == 0)
        throw ValueError(str_cat("SeqBoatModel::forward: batch row ", b, " is all padding"));
      c.pooled.row(b) /= T(c.counts[static_cast<std::size_t>(b)]);
    }
    Tensor2<T> logits(B, cfg_.d_output);
    as_matrix(logits) = decoder_.forward_rows(cmap(c.pooled));
    return logits;
  }

  /// dlogits (B, d_output) -> dx (B, L, d_input); adds to every parameter's gradient.
  Tensor3<T> backward(Context& ctx, const Tensor2<T>& dlogits, const Cache& c) {
    const Index B = c.x.dimension(0), L = c.x.dimension(1), D = cfg_.d_model;
    check_shape(dlogits, {B, cfg_.d_output}, "SeqBoatModel::backward: dlogits");
    const Mask* pad = ctx.padding_for(B, L, "SeqBoatModel::backward");
    const Matrix<T> dpooled = decoder_.backward_rows(cmap(c.pooled), as_matrix(dlogits));
    Tensor3<T> dtop(B, L, D);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t)
        as_matrix(dtop).row(b * L + t) =
            is_padding(pad, b, t) ? Matrix<T>::Zero(1, D) : Matrix<T>(dpooled.row(b) / T(c.counts[static_cast<std::size_t>(b)]));
    Tensor3<T> dh = cfg_.prenorm ? final_norm_.backward(ctx, dtop, c.final_norm) : std::move(dtop);
    dh = layers_.backward(ctx, dh, c.layers);
    Tensor3<T> dx(B, L, cfg_.d_input);
    as_matrix(dx) = encoder_.backward_rows(as_matrix(c.x), as_matrix(dh));
    return dx;
  }

 private:
  Config cfg_;
  Linear<T> encoder_;
  Stack<Layer> layers_;
  SequenceNorm<T> final_norm_;
  Linear<T> decoder_;
};

}  // namespace sma
