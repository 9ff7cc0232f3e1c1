// sma/layers/gau.hpp: the Gated Attention Unit of SeqBoat, run on a compressed (routed) batch.
//
// WHAT     On the packed activated tokens xc: base = silu(mx_proj(xc)) split into z (Z), r (H), v (H);
//          q = z*gamma[0] + beta[0], k = z*gamma[1] + beta[1]; out = local_attention(q, k, v) over a working
//          memory of W compressed slots (ops/local_attention.hpp); h = h_proj(out * r). ARCHITECTURE.md steps 6-9.
// SHAPES   xc (S, D) packed rows of a Compression  ->  h (S, D)
// PARAMS   mx_proj.weight (Z+2H, D), mx_proj.bias (Z+2H), h_proj.weight (D, H), h_proj.bias (D),
//          gamma (2, Z), beta (2, Z), and for the simple position bias rel_pos_bias.rel_pos_bias (2P-1, or 6W-1
//          with local positions). Names are the reference's, relative to the SeqBoat layer.
// GRADIENTS backward(dh) returns dxc (S, D) and adds to every parameter's gradient (docs/maths/gau.md).
// DROPOUT  in training, seeded by the Context: hidden_dropout on v, and attention_dropout on the attention weights
//          after the activation (as the reference). The attention mask is never stored: one seed per forward, and
//          the op regenerates each bit from (seed, query slot, key slot) in backward (ops/local_attention.hpp).
// A Gau is a "sparse module": it meets the contract Sma<Router, Module> expects (compose/sparse.hpp).
#pragma once

#include <sma/core/context.hpp>
#include <sma/core/init.hpp>
#include <sma/core/param.hpp>
#include <sma/layers/activation.hpp>
#include <sma/layers/dropout.hpp>
#include <sma/layers/linear.hpp>
#include <sma/ops/compress.hpp>
#include <sma/ops/local_attention.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sma {

template <class T>
class Gau {
 public:
  using Scalar = T;
  struct Config {
    Index dim = 0;   ///< D
    Index zdim = 0;  ///< Z (query/key width)
    Index hdim = 0;  ///< H (value width)
    ops::LocalAttentionConfig attention{};
    double hidden_dropout = 0.0;
    double attention_dropout = 0.0;
  };
  struct Cache {
    Matrix<T> xc;                        ///< (S, D) input (kept when saving for backward, else empty)
    Matrix<T> base;                      ///< (S, Z+2H) mx_proj output before silu (kept when saving for backward)
    Matrix<T> q, k, v, r;                ///< (S, Z) (S, Z) (S, H) (S, H) attention inputs and gate
    Matrix<T> v_mask;                    ///< (S, H) hidden-dropout scale (empty when no dropout)
    Matrix<T> att;                       ///< (S, H) attention output (kept when saving for backward)
    ops::LocalAttentionSaved<T> saved;   ///< per-query statistics for the attention backward
    double attention_dropout = 0;        ///< the attention-dropout rate the last forward applied (0: none)
    std::uint64_t attention_seed = 0;    ///< its mask's seed (the op regenerates the mask from it in backward)
    Matrix<T> hr;                        ///< unused: backward recomputes att * r in its scratch
    bool saved_for_backward = false;     ///< the last forward ran with ctx.save_for_backward
    /// Backward's buffers, reused across calls so that repeated shapes allocate nothing.
    struct Scratch {
      Matrix<T> hr, dhr, dq, dk, dv, dbase;
      std::vector<T> partial;
    };
    mutable Scratch scratch;
  };

  Gau() = default;
  explicit Gau(Config cfg)
      : cfg_(cfg),
        mx_proj_(typename Linear<T>::Config{cfg.dim, cfg.zdim + 2 * cfg.hdim, true}),
        h_proj_(typename Linear<T>::Config{cfg.hdim, cfg.dim, true}),
        gamma_("gamma", {2, cfg.zdim}),
        beta_("beta", {2, cfg.zdim}) {
    if (cfg.dim < 1 || cfg.zdim < 1 || cfg.hdim < 1)
      throw ValueError(str_cat("Gau: dim, zdim, hdim must be >= 1, got ", cfg.dim, ", ", cfg.zdim, ", ", cfg.hdim));
    if (cfg.attention.window < 1) throw ValueError(str_cat("Gau: window must be >= 1, got ", cfg.attention.window));
    if (cfg.attention.position == ops::PositionEncoding::rotary && cfg.zdim % 2 != 0)
      throw ValueError(str_cat("Gau: rotary positions need an even zdim, got ", cfg.zdim));
    const Index table = cfg.attention.bias_table_size();
    if (table > 0) rel_pos_bias_ = Param<T>("rel_pos_bias", {table});
    reset_parameters(0);
  }

  const Config& config() const { return cfg_; }
  Config& config() { return cfg_; }
  Index out_dim() const { return cfg_.dim; }
  bool has_bias_table() const { return rel_pos_bias_.size() > 0; }
  // Read-only views of the parameters, for code that runs the GAU's maths token by token (streaming decode).
  const Linear<T>& mx_proj() const { return mx_proj_; }
  const Linear<T>& h_proj() const { return h_proj_; }
  const Param<T>& gamma() const { return gamma_; }
  const Param<T>& beta() const { return beta_; }
  /// The position-bias table (bias_table_size() entries; empty when the configuration has none).
  const Param<T>& rel_pos_bias() const { return rel_pos_bias_; }

  /// The reference's initialisation: projections and gamma ~ truncated N(0, 0.02), zero biases and beta.
  void reset_parameters(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    mx_proj_.reset_parameters(rng());
    h_proj_.reset_parameters(rng());
    init::truncated_normal(gamma_, 0.0, 0.02, rng);
    beta_.fill(T(0));
    if (has_bias_table()) init::truncated_normal(rel_pos_bias_, 0.0, 0.02, rng);
  }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "mx_proj.", mx_proj_);
    visit_child(v, "h_proj.", h_proj_);
    v("gamma", gamma_);
    v("beta", beta_);
    if (has_bias_table()) v("rel_pos_bias.rel_pos_bias", rel_pos_bias_);
  }

  Matrix<T> forward(Context& ctx, CMatrixMap<T> xc, const Compression& comp, Cache& cache) const {
    Matrix<T> h;
    forward_into(ctx, xc, comp, cache, h);
    return h;
  }

  /// forward writing h into `h` (resized when its shape differs) and reusing the cache's storage: a call with the
  /// same shapes as the previous one allocates nothing. With ctx.save_for_backward false only q, k, v, r are kept
  /// (the projection and the attention output live in per-block scratch) and backward throws.
  void forward_into(Context& ctx, CMatrixMap<T> xc, const Compression& comp, Cache& cache, Matrix<T>& h) const {
    const Index S = comp.slots(), D = cfg_.dim;
    if (xc.rows() != S || xc.cols() != D)
      throw ShapeError(str_cat("Gau::forward: xc must be (", S, ", ", D, "), got (", xc.rows(), ", ", xc.cols(), ")"));
    draw_attention_dropout(ctx, cache);
    const bool save = ctx.save_for_backward;
    if (!save)
      cache.xc.resize(0, D);
    else if (cache.xc.data() != xc.data())
      cache.xc = xc;
    project(ctx, S, [&](Index s0, Index n, T*) { return CMatrixMap<T>(xc.data() + s0 * D, n, D); }, cache, save);
    h.resize(S, D);
    attend(comp, cache, save, [&](Index s0, Index n, const MatrixMap<T>& hb) { h.middleRows(s0, n) = hb; });
    cache.saved_for_backward = save;
  }

  /// The SeqBoat layer's fused forward: the GAU runs on xc = the rows comp.token of `tokens` (B*L, D), gathered
  /// block by block, and instead of returning h it adds out[token[s]] += gate[token[s]] * h[s] for every activated
  /// slot (extract_add). h is kept in `h_keep` (S, D) when saving for backward, else `h_keep` is emptied.
  void forward_extract_add(Context& ctx, CMatrixMap<T> tokens, const Compression& comp, const T* gate, Cache& cache,
                           MatrixMap<T> out, Matrix<T>& h_keep) const {
    const Index S = comp.slots(), D = cfg_.dim;
    if (tokens.rows() != comp.batch * comp.length || tokens.cols() != D || out.rows() != tokens.rows() ||
        out.cols() != D)
      throw ShapeError(str_cat("Gau::forward_extract_add: tokens (", tokens.rows(), ", ", tokens.cols(), ") and out (",
                               out.rows(), ", ", out.cols(), ") must both be (B*L, D) = (", comp.batch * comp.length,
                               ", ", D, ")"));
    draw_attention_dropout(ctx, cache);
    const bool save = ctx.save_for_backward;
    cache.xc.resize(save ? S : 0, D);
    project(
        ctx, S,
        [&](Index s0, Index n, T* scratch) {
          T* dst = save ? cache.xc.data() + s0 * D : scratch;
          for (Index i = 0; i < n; ++i) {
            const T* src = tokens.data() + comp.token[static_cast<std::size_t>(s0 + i)] * D;
            std::copy(src, src + D, dst + i * D);
          }
          return CMatrixMap<T>(dst, n, D);
        },
        cache, save);
    h_keep.resize(save ? S : 0, D);
    attend(comp, cache, save, [&](Index s0, Index n, const MatrixMap<T>& hb) {
      if (save) h_keep.middleRows(s0, n) = hb;
      for (Index i = 0; i < n; ++i) {
        const std::size_t s = static_cast<std::size_t>(s0 + i);
        if (!comp.key_valid[s]) continue;
        const Index tok = comp.token[s];
        out.row(tok) += gate[tok] * hb.row(i);
      }
    });
    cache.saved_for_backward = save;
  }

  Matrix<T> backward(Context& ctx, CMatrixMap<T> dh, const Compression& comp, const Cache& cache) {
    Matrix<T> dxc;
    backward_into(ctx, dh, comp, cache, dxc);
    return dxc;
  }

  /// backward writing dxc (S, D) into `dxc` (resized when its shape differs); its scratch lives in the cache.
  void backward_into(Context& ctx, CMatrixMap<T> dh, const Compression& comp, const Cache& cache, Matrix<T>& dxc) {
    const Index S = comp.slots(), Z = cfg_.zdim, H = cfg_.hdim, D = cfg_.dim, P = Z + 2 * H;
    if (dh.rows() != S || dh.cols() != D)
      throw ShapeError(str_cat("Gau::backward: dh must be (", S, ", ", D, "), got (", dh.rows(), ", ", dh.cols(), ")"));
    if (!cache.saved_for_backward || cache.base.rows() != S || cache.att.rows() != S || cache.xc.rows() != S)
      throw ValueError("Gau::backward: the cache holds nothing for backward (forward ran with "
                       "ctx.save_for_backward = false, or on other slots)");
    (void)ctx;
    auto& w = cache.scratch;
    // h = hr Wh^T + bh with hr = att * r (recomputed).
    w.hr.resize(S, H);
    detail::for_row_chunks(S, H, [&](Index r0, Index n) {
      w.hr.middleRows(r0, n).array() = cache.att.middleRows(r0, n).array() * cache.r.middleRows(r0, n).array();
    });
    h_proj_.accumulate_param_grads(w.hr, dh);
    w.dhr.resize(S, H);
    h_proj_.backward_input_into(dh, w.dhr);
    // d att = dhr * r (into the hr buffer, no longer needed).
    detail::for_row_chunks(S, H, [&](Index r0, Index n) {
      w.hr.middleRows(r0, n).array() = w.dhr.middleRows(r0, n).array() * cache.r.middleRows(r0, n).array();
    });
    const auto in = attention_input(comp, cache);
    ops::local_attention_backward<T>(attention_config(cache), in, bias_data(), cache.saved, cmap(w.hr), w.dq, w.dk, w.dv,
                                     has_bias_table() ? rel_pos_bias_.grad() : nullptr);
    dropout_backward_inplace(cache.v_mask, w.dv);
    // dbase = d act * silu'(base), d act = [dq g0 + dk g1 | dhr * att | dv]; z = silu(base[:, :Z]) feeds q and k
    // through the per-column affine maps, whose gradients are summed per block and then in block order.
    w.dbase.resize(S, P);
    const Index n_blocks = (S + detail::kRowBlock - 1) / detail::kRowBlock;
    w.partial.assign(static_cast<std::size_t>(n_blocks * 4 * Z), T(0));
    const auto g = gamma_.mat();
    detail::for_row_blocks(S, 30.0 * double(S) * double(P), [&](Index s0, Index n) {
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> part(w.partial.data() + (s0 / detail::kRowBlock) * 4 * Z, 4 * Z);
      Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> sg(scratch(static_cast<std::size_t>(P)), P);  // sigmoid(base)
      for (Index s = s0; s < s0 + n; ++s) {
        const auto b = cache.base.row(s).array();
        sg = (T(1) + (-b).exp()).inverse();
        auto db = w.dbase.row(s).array();
        const auto dq = w.dq.row(s).array();
        const auto dk = w.dk.row(s).array();
        const auto bz = b.head(Z);
        const auto sz = sg.head(Z);
        part.segment(0, Z) += (dq * bz * sz).transpose();  // z = silu(bz) = bz sigmoid(bz)
        part.segment(Z, Z) += (dk * bz * sz).transpose();
        part.segment(2 * Z, Z) += dq.transpose();
        part.segment(3 * Z, Z) += dk.transpose();
        db.head(Z) = (dq * g.row(0).array() + dk * g.row(1).array()) * (sz * (T(1) + bz * (T(1) - sz)));
        const auto sr = sg.segment(Z, H);
        db.segment(Z, H) = w.dhr.row(s).array() * cache.att.row(s).array() *
                           (sr * (T(1) + b.segment(Z, H) * (T(1) - sr)));
        const auto sv = sg.tail(H);
        db.tail(H) = w.dv.row(s).array() * (sv * (T(1) + b.tail(H) * (T(1) - sv)));
      }
    });
    auto dg = gamma_.grad_mat();
    auto dbt = beta_.grad_mat();
    for (Index blk = 0; blk < n_blocks; ++blk) {
      const T* part = w.partial.data() + blk * 4 * Z;
      for (Index j = 0; j < Z; ++j) {
        dg(0, j) += part[j];
        dg(1, j) += part[Z + j];
        dbt(0, j) += part[2 * Z + j];
        dbt(1, j) += part[3 * Z + j];
      }
    }
    mx_proj_.accumulate_param_grads(cache.xc, w.dbase);
    dxc.resize(S, D);
    mx_proj_.backward_input_into(w.dbase, dxc);
  }

 private:
  const T* bias_data() const { return has_bias_table() ? rel_pos_bias_.data() : nullptr; }

  // Training with attention dropout draws one seed per forward from ctx.rng; the op derives every mask bit from it.
  void draw_attention_dropout(Context& ctx, Cache& cache) const {
    cache.attention_dropout = ctx.training() ? cfg_.attention_dropout : 0.0;
    cache.attention_seed = cache.attention_dropout > 0 ? ctx.rng() : 0;
  }

  ops::LocalAttentionConfig attention_config(const Cache& cache) const {
    ops::LocalAttentionConfig ac = cfg_.attention;
    ac.dropout = cache.attention_dropout;
    ac.dropout_seed = cache.attention_seed;
    return ac;
  }

  /// Per-thread grow-only scratch of the fused blocks (never holds anything between calls).
  static T* scratch(std::size_t n) {
    thread_local std::vector<T, Eigen::aligned_allocator<T>> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }

  // Steps 1-2 on blocks of slots: base = mx_proj(xc) (into cache.base when saving, else per-block scratch), then
  // q = z gamma0 + beta0, k = z gamma1 + beta1 (z = silu(base[:, :Z])), r, v = silu of the next two H-column
  // ranges. rows(s0, n, scratch) yields xc rows s0..s0+n-1 (n x D), using `scratch` if it has to copy them.
  template <class Rows>
  void project(Context& ctx, Index S, Rows&& rows, Cache& cache, bool save) const {
    const Index D = cfg_.dim, Z = cfg_.zdim, H = cfg_.hdim, P = Z + 2 * H;
    cache.base.resize(save ? S : 0, P);
    cache.q.resize(S, Z);
    cache.k.resize(S, Z);
    cache.r.resize(S, H);
    cache.v.resize(S, H);
    const auto W = mx_proj_.weight().mat();
    const auto bias = mx_proj_.bias().mat();
    const bool has_bias = mx_proj_.has_bias();
    const auto g = gamma_.mat();
    const auto bt = beta_.mat();
    detail::for_row_blocks(S, 2.0 * double(S) * double(D) * double(P), [&](Index s0, Index n) {
      T* buf = scratch(static_cast<std::size_t>(n * (D + P)));
      const CMatrixMap<T> x = rows(s0, n, buf);
      MatrixMap<T> bs(save ? cache.base.data() + s0 * P : buf + n * D, n, P);
      bs.noalias() = x * W.transpose();
      if (has_bias) bs.rowwise() += bias.row(0);
      for (Index i = 0; i < n; ++i) {
        const Index s = s0 + i;
        const auto br = bs.row(i).array();
        auto q = cache.q.row(s).array();
        q = br.head(Z) / (T(1) + (-br.head(Z)).exp());  // z
        cache.k.row(s).array() = q * g.row(1).array() + bt.row(1).array();
        q = q * g.row(0).array() + bt.row(0).array();
        cache.r.row(s).array() = br.segment(Z, H) / (T(1) + (-br.segment(Z, H)).exp());
        cache.v.row(s).array() = br.tail(H) / (T(1) + (-br.tail(H)).exp());
      }
    });
    dropout_inplace(ctx, cfg_.hidden_dropout, cache.v, cache.v_mask);
  }

  // Steps 7-9: the attention, the gate r and h_proj. hsink(s0, n, hb) receives h rows s0..s0+n-1 (n x D), from
  // several threads at once (disjoint rows). Saving: att is kept and h computed in row blocks from att * r; else
  // each attention block's output goes straight through the gate and h_proj (nothing of size S x H is stored).
  template <class HSink>
  void attend(const Compression& comp, Cache& cache, bool save, HSink&& hsink) const {
    const Index S = comp.slots(), H = cfg_.hdim, D = cfg_.dim;
    const auto in = attention_input(comp, cache);
    const auto Wh = h_proj_.weight().mat();
    const auto bias = h_proj_.bias().mat();
    const bool has_bias = h_proj_.has_bias();
    if (save) {
      cache.att.resize(S, H);
      ops::local_attention_forward_into<T>(attention_config(cache), in, bias_data(), &cache.saved, map(cache.att));
      detail::for_row_blocks(S, 2.0 * double(S) * double(H) * double(D), [&](Index s0, Index n) {
        T* buf = scratch(static_cast<std::size_t>(n * (H + D)));
        MatrixMap<T> hr(buf, n, H);
        hr.array() = cache.att.middleRows(s0, n).array() * cache.r.middleRows(s0, n).array();
        MatrixMap<T> hb(buf + n * H, n, D);
        hb.noalias() = hr * Wh.transpose();
        if (has_bias) hb.rowwise() += bias.row(0);
        hsink(s0, n, hb);
      });
    } else {
      cache.att.resize(0, H);
      ops::local_attention_forward_blocks<T>(
          attention_config(cache), in, bias_data(), &cache.saved, [&](Index q0, Index nq, Index k0, Index nk, const MatrixMap<T>& a) {
            T* buf = scratch(static_cast<std::size_t>(nq * (H + D)));
            MatrixMap<T> hr(buf, nq, H);
            hr.noalias() = a * cache.v.middleRows(k0, nk);
            hr.array() *= cache.r.middleRows(q0, nq).array();
            MatrixMap<T> hb(buf + nq * H, nq, D);
            hb.noalias() = hr * Wh.transpose();
            if (has_bias) hb.rowwise() += bias.row(0);
            hsink(q0, nq, hb);
          });
    }
  }

  // Compressed batches hold activated tokens only, so every key is valid; the uncompressed fallback masks keys.
  static ops::LocalAttentionInput<T> attention_input(const Compression& comp, const Cache& cache) {
    return ops::LocalAttentionInput<T>{cmap(cache.q), cmap(cache.k), cmap(cache.v), &comp.offsets, &comp.positions,
                                       comp.compressed ? nullptr : &comp.key_valid};
  }

  Config cfg_;
  Linear<T> mx_proj_, h_proj_;
  Param<T> gamma_, beta_, rel_pos_bias_;
};

}  // namespace sma
