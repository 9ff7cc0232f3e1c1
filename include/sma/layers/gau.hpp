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
// DROPOUT  hidden_dropout on v in training (seeded by the Context); attention-weight dropout is not implemented:
//          a non-zero attention_dropout in training throws ValueError rather than silently doing nothing.
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
    Matrix<T> xc;                        ///< (S, D) input
    Matrix<T> base;                      ///< (S, Z+2H) mx_proj output before silu
    Matrix<T> q, k, v, r;                ///< (S, Z) (S, Z) (S, H) (S, H) attention inputs and gate
    Matrix<T> v_mask;                    ///< (S, H) hidden-dropout scale (empty when no dropout)
    Matrix<T> att;                       ///< (S, H) attention output
    ops::LocalAttentionSaved<T> saved;   ///< per-query statistics for the attention backward
    Matrix<T> hr;                        ///< (S, H) att * r, the input of h_proj
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
    const Index S = comp.slots(), Z = cfg_.zdim, H = cfg_.hdim;
    if (xc.rows() != S || xc.cols() != cfg_.dim)
      throw ShapeError(str_cat("Gau::forward: xc must be (", S, ", ", cfg_.dim, "), got (", xc.rows(), ", ",
                               xc.cols(), ")"));
    if (ctx.training() && cfg_.attention_dropout > 0)
      throw ValueError(str_cat("Gau: attention_dropout ", cfg_.attention_dropout,
                               " is not implemented in training; set it to 0"));
    cache.xc = xc;
    cache.base = mx_proj_.forward_rows(xc);
    const Matrix<T> act = silu(cmap(cache.base));
    const auto g = gamma_.mat();
    const auto bt = beta_.mat();
    cache.q = (act.leftCols(Z).array().rowwise() * g.row(0).array()).rowwise() + bt.row(0).array();
    cache.k = (act.leftCols(Z).array().rowwise() * g.row(1).array()).rowwise() + bt.row(1).array();
    cache.r = act.middleCols(Z, H);
    cache.v = act.rightCols(H);
    dropout_inplace(ctx, cfg_.hidden_dropout, cache.v, cache.v_mask);
    const auto in = attention_input(comp, cache);
    cache.att = ops::local_attention_forward<T>(cfg_.attention, in, bias_data(), &cache.saved);
    cache.hr = cache.att.cwiseProduct(cache.r);
    return h_proj_.forward_rows(cmap(cache.hr));
  }

  Matrix<T> backward(Context& ctx, CMatrixMap<T> dh, const Compression& comp, const Cache& cache) {
    const Index S = comp.slots(), Z = cfg_.zdim, H = cfg_.hdim;
    if (dh.rows() != S || dh.cols() != cfg_.dim)
      throw ShapeError(str_cat("Gau::backward: dh must be (", S, ", ", cfg_.dim, "), got (", dh.rows(), ", ",
                               dh.cols(), ")"));
    const Matrix<T> dhr = h_proj_.backward_rows(cmap(cache.hr), dh);
    const Matrix<T> datt = dhr.cwiseProduct(cache.r);
    Matrix<T> dact(S, Z + 2 * H);
    dact.middleCols(Z, H) = dhr.cwiseProduct(cache.att);
    Matrix<T> dq, dk, dv;
    const auto in = attention_input(comp, cache);
    ops::local_attention_backward<T>(cfg_.attention, in, bias_data(), cache.saved, cmap(datt), dq, dk, dv,
                                     has_bias_table() ? rel_pos_bias_.grad() : nullptr);
    dropout_backward_inplace(cache.v_mask, dv);
    dact.rightCols(H) = dv;
    // z feeds q and k through the per-column affine maps.
    const Matrix<T> z = silu(cmap(cache.base)).leftCols(Z);
    auto g = gamma_.mat();
    auto dg = gamma_.grad_mat();
    auto dbt = beta_.grad_mat();
    dg.row(0) += (dq.array() * z.array()).colwise().sum().matrix();
    dg.row(1) += (dk.array() * z.array()).colwise().sum().matrix();
    dbt.row(0) += dq.colwise().sum();
    dbt.row(1) += dk.colwise().sum();
    dact.leftCols(Z) = (dq.array().rowwise() * g.row(0).array() + dk.array().rowwise() * g.row(1).array()).matrix();
    const Matrix<T> dbase = silu_backward(cmap(cache.base), cmap(dact));
    return mx_proj_.backward_rows(cmap(cache.xc), cmap(dbase));
  }

 private:
  const T* bias_data() const { return has_bias_table() ? rel_pos_bias_.data() : nullptr; }

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
