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
#include <string_view>
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
    bool fused = false;        ///< filled by the fused path (see forward); else by the step-by-step one
    bool saved_for_backward = false;

    /// Buffers reused across calls: with a Cache kept from one call to the next, a call with the same shapes
    /// allocates nothing large. Backward's buffers are mutable because backward takes the Cache as const.
    struct Workspace {
      Tensor3<T> xm;                             ///< (B, L, D) EMA input with padded rows zeroed (padding only)
      Matrix<T> dpre, dhc, dxc, dhu, dmx;        ///< backward: (N, D) (S, D) (S, D) (N, 2+D) (N, D)
      Tensor3<T> act, dxn;                       ///< backward: (B, L, D) post-norm gradient, EMA input gradient
      std::vector<T> dgate;                      ///< backward: (N)
    };
    mutable Workspace ws;

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

  /// x (B, L, D) -> (B, L, D); see the class comment. The Cache is also a workspace: reused across calls of the
  /// same shapes, nothing large is allocated (forward_into avoids the output's allocation as well).
  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& c) const {
    Tensor3<T> out;
    forward_into(ctx, x, c, out);
    return out;
  }

  /// forward writing into `out` (reallocated only when its shape differs).
  ///
  /// Two implementations give the same numbers up to rounding. The fused one (everything but dropout in training)
  /// works on row blocks in parallel: the EMA by a vectorised scan (or FFT, by cost), silu, the router logits and
  /// hx in one pass, the GAU on gathered rows with its attention, gate and h_proj fused per query block, the
  /// gated extraction added in place; what it keeps follows ctx.save_for_backward (false: nothing for backward;
  /// true: what backward needs, plus hx_proj's full output in eval mode for inspection). Dropout in training
  /// takes the step-by-step path, which draws the masks in the reference's order.
  void forward_into(Context& ctx, const Tensor3<T>& x, Cache& c, Tensor3<T>& out) const {
    check_shape(x, {-1, -1, cfg_.embed_dim}, "SeqBoatLayer::forward: x (B, L, D)");
    if (ctx.check_finite) check_finite(x, "SeqBoatLayer::forward: x");
    (void)ctx.padding_for(x.dimension(0), x.dimension(1), "SeqBoatLayer::forward");
    if (ctx.training() && cfg_.dropout > 0) {
      out = forward_generic(ctx, x, c);
      c.fused = false;
      c.saved_for_backward = ctx.save_for_backward;
    } else {
      forward_fused(ctx, x, c, out);
      c.fused = true;
      c.saved_for_backward = ctx.save_for_backward;
    }
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& c) {
    Tensor3<T> dx;
    backward_into(ctx, dy, c, dx);
    return dx;
  }

  /// backward writing into `dx` (reallocated only when its shape differs); its scratch lives in the Cache.
  void backward_into(Context& ctx, const Tensor3<T>& dy, const Cache& c, Tensor3<T>& dx) {
    check_shape(dy, {c.batch, c.length, cfg_.embed_dim}, "SeqBoatLayer::backward: dy");
    if (!c.saved_for_backward)
      throw ValueError("SeqBoatLayer::backward: the cache holds nothing for backward (forward ran with "
                       "ctx.save_for_backward = false)");
    if (c.fused)
      backward_fused(ctx, dy, c, dx);
    else
      dx = backward_generic(ctx, dy, c);
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
  // The step-by-step path (dropout in training): each stage through its layer's own forward.
  Tensor3<T> forward_generic(Context& ctx, const Tensor3<T>& x, Cache& c) const {
    const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.embed_dim;
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

  Tensor3<T> backward_generic(Context& ctx, const Tensor3<T>& dy, const Cache& c) {
    const Index B = c.batch, L = c.length, D = cfg_.embed_dim, N = B * L;
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


  // ---- the fused path ----

  /// The EMA's parameters, read through visit_params (which does not modify the layer).
  struct EmaParams {
    Param<T>* delta = nullptr;
    Param<T>* alpha = nullptr;
    Param<T>* beta = nullptr;
    Param<T>* gamma = nullptr;
    Param<T>* omega = nullptr;
    ops::EmaParamsRef<T> ref() const { return {delta->data(), alpha->data(), beta->data(), gamma->data()}; }
    ops::EmaGradsRef<T> grads() const { return {delta->grad(), alpha->grad(), beta->grad(), gamma->grad()}; }
  };
  EmaParams ema_params() const {
    EmaParams p;
    const_cast<MultiHeadEma<T>&>(ssm_).visit_params([&](const auto& name, Param<T>& prm) {
      const std::string_view n(name);
      if (n == "delta") p.delta = &prm;
      if (n == "alpha") p.alpha = &prm;
      if (n == "beta") p.beta = &prm;
      if (n == "gamma") p.gamma = &prm;
      if (n == "omega") p.omega = &prm;
    });
    return p;
  }

  ops::EmaShape ema_shape(Index B, Index L) const {
    ops::EmaShape sh;
    sh.batch = B;
    sh.length = L;
    sh.dim = cfg_.embed_dim;
    sh.order = ssm_.config().ndim;
    sh.direction = ssm_.config().direction;
    sh.truncation = ssm_.config().truncation;
    return sh;
  }

  /// The EMA input with padded rows zeroed: xin itself without padding, else a copy in the workspace.
  static const T* ema_masked_input(const Tensor3<T>& xin, const Mask* pad, Tensor3<T>& store) {
    if (!pad) return xin.data();
    if (store.dimensions() != xin.dimensions()) store = Tensor3<T>(xin.dimensions());
    const Index B = xin.dimension(0), L = xin.dimension(1), D = xin.dimension(2);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) {
        const T* src = xin.data() + (b * L + t) * D;
        T* dst = store.data() + (b * L + t) * D;
        if ((*pad)(b, t))
          std::fill(dst, dst + D, T(0));
        else
          std::copy(src, src + D, dst);
      }
    return store.data();
  }

  static void resize_like(Tensor3<T>& t, Index B, Index L, Index D) {
    if (t.dimension(0) != B || t.dimension(1) != L || t.dimension(2) != D) t = uninitialized<T, 3>({B, L, D});
  }

  void forward_fused(Context& ctx, const Tensor3<T>& x, Cache& c, Tensor3<T>& out) const {
    const Index B = x.dimension(0), L = x.dimension(1), D = cfg_.embed_dim, N = B * L;
    const Mask* pad = ctx.padding_for(B, L, "SeqBoatLayer::forward");
    const bool save = ctx.save_for_backward;
    const bool inspect = save && !ctx.training();  // eval forwards keep hx_proj's output for inspection
    const int threads = ctx.num_threads();
    c.batch = B;
    c.length = L;
    c.mx_mask.resize(0, 0);
    c.hc_mask.resize(0, 0);
    c.sum_mask.resize(0, 0);

    // 1-2. norm (pre-norm), EMA + omega x. The EMA's input is kept for backward in norm_io (pre-norm) or ssm.x.
    const Tensor3<T>* xin = &x;
    if (cfg_.prenorm) {
      norm_.forward_into(ctx, x, c.norm, c.norm_io);
      xin = &c.norm_io;
    }
    if (!cfg_.prenorm && save)
      c.ssm.x = x;
    else
      c.ssm.x = Tensor3<T>();
    c.ssm.has_padding = pad != nullptr;
    if (pad && save) c.ssm.padding = *pad;
    const EmaParams ep = ema_params();
    resize_like(c.ema_out, B, L, D);
    ops::ema_forward(ssm_.config().algo, ema_shape(B, L), ep.ref(), ema_masked_input(*xin, pad, c.ws.xm),
                     c.ema_out.data(), threads);
    {
      const auto omega = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(ep.omega->data(), D);
      const CMatrixMap<T> X = as_matrix(*xin);
      MatrixMap<T> E = as_matrix(c.ema_out);
      detail::for_row_chunks(N, D, [&](Index r0, Index n) {
        E.middleRows(r0, n).array() += X.middleRows(r0, n).array().rowwise() * omega;
      });
    }

    // 3. per row block: mx = silu(e); router logits u = mx Wu^T + bu (+ shift); pre = mx Wx^T + bx + x.
    //    Without saving, mx overwrites the norm output (dead after the EMA) and pre the EMA output, row by row.
    T* mx_ptr;
    if (!save && cfg_.prenorm) {
      c.mx.resize(0, D);
      mx_ptr = c.norm_io.data();
    } else {
      c.mx.resize(N, D);
      mx_ptr = c.mx.data();
    }
    T* pre_ptr;
    if (save) {
      resize_like(c.pre, B, L, D);
      pre_ptr = c.pre.data();
    } else {
      c.pre = Tensor3<T>();
      pre_ptr = c.ema_out.data();
    }
    c.u.resize(N, kOptions);
    c.hu.resize(inspect ? N : 0, kOptions + D);
    {
      const auto W = hx_proj_.weight().mat();                   // (2+D, D)
      const auto bias = hx_proj_.bias().mat().row(0);            // (2+D)
      const T shift = T(cfg_.router_shift / 2);
      const CMatrixMap<T> X = as_matrix(x);
      detail::for_row_blocks(N, 2.0 * double(N) * double(D) * double(D + kOptions), [&](Index r0, Index n) {
        MatrixMap<T> mxb(mx_ptr + r0 * D, n, D);
        const CMatrixMap<T> eb(c.ema_out.data() + r0 * D, n, D);
        mxb.array() = eb.array() / (T(1) + (-eb.array()).exp());
        auto ub = c.u.middleRows(r0, n);
        ub.noalias() = mxb * W.topRows(kOptions).transpose();
        ub.rowwise() += bias.head(kOptions);
        MatrixMap<T> pb(pre_ptr + r0 * D, n, D);
        pb.noalias() = mxb * W.bottomRows(D).transpose();
        pb.rowwise() += bias.tail(D);
        if (inspect) {
          c.hu.middleRows(r0, n).leftCols(kOptions) = ub;
          c.hu.middleRows(r0, n).rightCols(D) = pb;
        }
        pb += X.middleRows(r0, n);
        if (cfg_.router_shift != 0) {
          ub.col(1).array() += shift;
          ub.col(0).array() -= shift;
        }
      });
    }

    // 4. routing and the compression plan.
    q_router_.forward(ctx, cmap(c.u), B, L, c.router);
    plan_compression_into(c.router.active, cfg_.routing, c.comp);

    // 5. the GAU on the activated rows of mx; pre[token] += gate * h.
    MatrixMap<T> pre_m(pre_ptr, N, D);
    if (!c.comp.empty())
      gau_.forward_extract_add(ctx, CMatrixMap<T>(mx_ptr, N, D), c.comp, c.router.gate.data(), c.gau, pre_m, c.hc);
    else
      c.hc.resize(0, D);

    // 6. out = silu(pre), then the norm when post-norm.
    Tensor3<T>& act = cfg_.prenorm ? out : c.norm_io;
    resize_like(act, B, L, D);
    MatrixMap<T> A = as_matrix(act);
    detail::for_row_chunks(N, D, [&](Index r0, Index n) {
      const auto p = pre_m.middleRows(r0, n).array();
      A.middleRows(r0, n).array() = p / (T(1) + (-p).exp());
    });
    if (!cfg_.prenorm) norm_.forward_into(ctx, c.norm_io, c.norm, out);
  }

  void backward_fused(Context& ctx, const Tensor3<T>& dy, const Cache& c, Tensor3<T>& dx) {
    const Index B = c.batch, L = c.length, D = cfg_.embed_dim, N = B * L;
    auto& w = c.ws;
    const int threads = ctx.num_threads();

    // d pre = d act * silu'(pre); post-norm: d act from the norm's backward.
    const Tensor3<T>* g = &dy;
    if (!cfg_.prenorm) {
      norm_.backward_into(ctx, dy, c.norm, w.act);
      g = &w.act;
    }
    w.dpre.resize(N, D);
    {
      const CMatrixMap<T> G = as_matrix(*g), P = as_matrix(c.pre);
      detail::for_row_chunks(N, D, [&](Index r0, Index n) {
        const auto p = P.middleRows(r0, n).array();
        auto d = w.dpre.middleRows(r0, n).array();
        d = (T(1) + (-p).exp()).inverse();  // sigmoid(pre), then silu'(pre) * g
        d = G.middleRows(r0, n).array() * (d * (T(1) + p * (T(1) - d)));
      });
    }

    // The GAU branch: dhc = gate * dpre[token], d gate = <dpre[token], hc>, then the GAU's backward.
    w.dgate.assign(static_cast<std::size_t>(N), T(0));
    const Index S = c.comp.slots();
    if (!c.comp.empty()) {
      w.dhc.resize(S, D);
      const T* gate = c.router.gate.data();
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && S * D > (1 << 16))
      for (Index s = 0; s < S; ++s) {
        if (!c.comp.key_valid[static_cast<std::size_t>(s)]) {
          w.dhc.row(s).setZero();
          continue;
        }
        const Index tok = c.comp.token[static_cast<std::size_t>(s)];
        w.dhc.row(s) = gate[tok] * w.dpre.row(tok);
        w.dgate[static_cast<std::size_t>(tok)] = w.dpre.row(tok).dot(c.hc.row(s));
      }
      gau_.backward_into(ctx, cmap(w.dhc), c.comp, c.gau, w.dxc);
    }

    // hx_proj: d hu = [d logits | dpre]; dmx = d hu W, plus the compressed rows' gradient.
    w.dhu.resize(N, kOptions + D);
    w.dhu.leftCols(kOptions) = q_router_.backward(cmap(c.u), w.dgate, c.router);
    detail::for_row_chunks(N, D, [&](Index r0, Index n) {
      w.dhu.middleRows(r0, n).rightCols(D) = w.dpre.middleRows(r0, n);
    });
    hx_proj_.accumulate_param_grads(c.mx, w.dhu);
    w.dmx.resize(N, D);
    hx_proj_.backward_input_into(w.dhu, w.dmx);
    if (!c.comp.empty()) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && S * D > (1 << 16))
      for (Index s = 0; s < S; ++s) w.dmx.row(c.comp.token[static_cast<std::size_t>(s)]) += w.dxc.row(s);
    }
    // de = dmx * silu'(e), in place.
    silu_backward_inplace(as_matrix(c.ema_out), w.dmx);

    // The EMA: dxin = (1 - pad) conv^T(de) + omega de; d omega = sum de * xin.
    const Tensor3<T>& xin = cfg_.prenorm ? c.norm_io : c.ssm.x;
    const Mask* pad = c.ssm.has_padding ? &c.ssm.padding : nullptr;
    const EmaParams ep = ema_params();
    resize_like(w.dxn, B, L, D);
    ops::ema_backward(ssm_.config().algo, ema_shape(B, L), ep.ref(), ema_masked_input(xin, pad, w.xm), w.dmx.data(),
                      w.dxn.data(), ep.grads(), threads);
    {
      const auto omega = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(ep.omega->data(), D);
      MatrixMap<T> DX = as_matrix(w.dxn);
      const CMatrixMap<T> X = as_matrix(xin);
      detail::for_row_chunks(N, D, [&](Index r0, Index n) {
        for (Index i = r0; i < r0 + n; ++i)
          if (pad && (*pad)(i / L, i % L)) DX.row(i).setZero();
        DX.middleRows(r0, n).array() += w.dmx.middleRows(r0, n).array().rowwise() * omega;
      });
      Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>(ep.omega->grad(), D) +=
          (w.dmx.array() * X.array()).colwise().sum();
    }

    // The norm (pre-norm) and the residual.
    if (cfg_.prenorm)
      norm_.backward_into(ctx, w.dxn, c.norm, dx);
    else
      std::swap(dx, w.dxn);
    if (dx.dimension(0) != B || dx.dimension(1) != L || dx.dimension(2) != D)
      throw ShapeError("SeqBoatLayer::backward: internal shape mismatch");
    MatrixMap<T> DXo = as_matrix(dx);
    detail::for_row_chunks(N, D, [&](Index r0, Index n) { DXo.middleRows(r0, n) += w.dpre.middleRows(r0, n); });
  }

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
