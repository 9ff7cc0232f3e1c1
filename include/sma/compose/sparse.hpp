// sma/compose/sparse.hpp: Sparse Modular Activation as a template, Sma<Router, Module>.
//
// WHAT     A router decides per token whether `Module` runs on it. The activated tokens of each batch row are
//          compressed into a ragged packed batch (ops/compress.hpp), the module runs on that, and its output is
//          extracted back to the tokens' positions and scaled by the router's gate:
//              y_i = gate_i * Module(compress(x))[slot(i)]   (0 for tokens that are not activated)
//          so the routing decision is trained through the gate (ARCHITECTURE.md section 2). Wrap it in Residual<>
//          to add the skip path: tokens the router passes over then flow through unchanged.
// SHAPES   x (B, L, D) -> y (B, L, Dout). Padding (ctx.padding) is never activated.
// PARAMS   "router." + the router's, "module." + the module's (override with set_names).
//
// A sparse MODULE provides (Gau is one):
//   using Scalar; struct Cache; template <class V> void visit_params(V&&); Index out_dim() const;
//   Matrix<T> forward(Context&, CMatrixMap<T> xc /*(S, D)*/, const Compression&, Cache&) const;   // (S, Dout)
//   Matrix<T> backward(Context&, CMatrixMap<T> dh /*(S, Dout)*/, const Compression&, const Cache&); // dxc, adds grads
// A ROUTER provides:
//   using Scalar; struct Cache; template <class V> void visit_params(V&&);
//   void forward(Context&, CMatrixMap<T> x /*(B*L, D)*/, Index B, Index L, Cache&) const;
//   static const Tensor2<std::uint8_t>& active(const Cache&);  static const std::vector<T>& gate(const Cache&);
//   Matrix<T> backward(CMatrixMap<T> x, const std::vector<T>& dgate, const Cache&);                // dx (B*L, D)
#pragma once

#include <sma/core/layer.hpp>
#include <sma/layers/linear.hpp>
#include <sma/layers/router.hpp>
#include <sma/ops/compress.hpp>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma {

namespace detail {

template <class M, class = void>
struct has_sparse_forward : std::false_type {};
template <class M>
struct has_sparse_forward<M, void_t<decltype(std::declval<const M&>().forward(
                                 std::declval<Context&>(), std::declval<CMatrixMap<typename M::Scalar>>(),
                                 std::declval<const Compression&>(), std::declval<typename M::Cache&>()))>>
    : std::true_type {};

template <class M, class = void>
struct has_sparse_backward : std::false_type {};
template <class M>
struct has_sparse_backward<M, void_t<decltype(std::declval<M&>().backward(
                                  std::declval<Context&>(), std::declval<CMatrixMap<typename M::Scalar>>(),
                                  std::declval<const Compression&>(), std::declval<const typename M::Cache&>()))>>
    : std::true_type {};

template <class R, class = void>
struct has_route : std::false_type {};
template <class R>
struct has_route<R, void_t<decltype(std::declval<const R&>().forward(
                        std::declval<Context&>(), std::declval<CMatrixMap<typename R::Scalar>>(), Index(), Index(),
                        std::declval<typename R::Cache&>())),
                    decltype(R::active(std::declval<const typename R::Cache&>())),
                    decltype(R::gate(std::declval<const typename R::Cache&>()))>> : std::true_type {};

}  // namespace detail

/// One static_assert per requirement of a sparse module (see the header comment).
template <class M>
constexpr bool check_sparse_module() {
  static_assert(detail::has_scalar<M>::value, "sma::Sma: the module must define 'using Scalar = ...;'");
  static_assert(detail::has_cache<M>::value, "sma::Sma: the module must define a nested 'struct Cache'");
  static_assert(detail::has_sparse_forward<M>::value,
                "sma::Sma: the module must define 'Matrix<Scalar> forward(Context&, CMatrixMap<Scalar>, const Compression&, Cache&) const' (compose/sparse.hpp)");
  static_assert(detail::has_sparse_backward<M>::value,
                "sma::Sma: the module must define 'Matrix<Scalar> backward(Context&, CMatrixMap<Scalar>, const Compression&, const Cache&)' (compose/sparse.hpp)");
  return true;
}

/// One static_assert per requirement of a router.
template <class R>
constexpr bool check_router() {
  static_assert(detail::has_scalar<R>::value, "sma::Sma: the router must define 'using Scalar = ...;'");
  static_assert(detail::has_cache<R>::value, "sma::Sma: the router must define a nested 'struct Cache'");
  static_assert(detail::has_route<R>::value,
                "sma::Sma: the router must define forward(Context&, CMatrixMap<Scalar>, Index B, Index L, Cache&) const and static active(cache), gate(cache) (compose/sparse.hpp)");
  return true;
}

/// The standard router: logits = Linear(D -> M)(x), then the latent configurator (learned temperature).
/// PARAMS  proj.weight (M, D), proj.bias (M), configurator.temp (1).
template <class T>
class LinearRouter {
 public:
  using Scalar = T;
  struct Config {
    Index dim = 0;
    Index options = 2;
    double init_temp_scale = 1.0;
  };
  struct Cache {
    Matrix<T> logits;  ///< (N, M)
    typename LatentConfigurator<T>::Cache configurator;
  };

  LinearRouter() = default;
  explicit LinearRouter(Config cfg, std::uint64_t seed = 0)
      : proj_(typename Linear<T>::Config{cfg.dim, cfg.options, true}, seed),
        configurator_(typename LatentConfigurator<T>::Config{cfg.dim, cfg.options, cfg.init_temp_scale}) {}

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "proj.", proj_);
    visit_child(v, "configurator.", configurator_);
  }
  Linear<T>& proj() { return proj_; }

  void forward(Context& ctx, CMatrixMap<T> x, Index B, Index L, Cache& c) const {
    c.logits = proj_.forward_rows(x);
    configurator_.forward(ctx, cmap(c.logits), B, L, c.configurator);
  }
  static const Tensor2<std::uint8_t>& active(const Cache& c) { return c.configurator.active; }
  static const std::vector<T>& gate(const Cache& c) { return c.configurator.gate; }

  Matrix<T> backward(CMatrixMap<T> x, const std::vector<T>& dgate, const Cache& c) {
    const Matrix<T> dlogits = configurator_.backward(cmap(c.logits), dgate, c.configurator);
    return proj_.backward_rows(x, dlogits);
  }

 private:
  Linear<T> proj_;
  LatentConfigurator<T> configurator_;
};

template <class Router, class Module>
class Sma {
  static_assert(check_router<Router>());
  static_assert(check_sparse_module<Module>());
  static_assert(std::is_same<typename Router::Scalar, typename Module::Scalar>::value,
                "sma::Sma: router and module must use the same Scalar type");

 public:
  using Scalar = typename Module::Scalar;
  using T = Scalar;
  static constexpr Index kInDim = Dynamic, kOutDim = Dynamic;
  struct Cache {
    Tensor3<T> x;
    typename Router::Cache router;
    Compression comp;
    typename Module::Cache module;
    Matrix<T> hc;  ///< (S, Dout)
  };

  Sma() = default;
  Sma(Router router, Module module, RoutingSemantics semantics = RoutingSemantics::per_row)
      : router_(std::move(router)), module_(std::move(module)), semantics_(semantics) {}

  Router& router() { return router_; }
  Module& module() { return module_; }
  void set_names(std::string router_prefix, std::string module_prefix) {
    router_prefix_ = std::move(router_prefix);
    module_prefix_ = std::move(module_prefix);
  }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, router_prefix_, router_);
    visit_child(v, module_prefix_, module_);
  }

  Tensor3<T> forward(Context& ctx, const Tensor3<T>& x, Cache& c) const {
    const Index B = x.dimension(0), L = x.dimension(1);
    (void)ctx.padding_for(B, L, "Sma::forward");
    c.x = x;
    router_.forward(ctx, as_matrix(x), B, L, c.router);
    c.comp = plan_compression(Router::active(c.router), semantics_);
    Tensor3<T> y = zeros<T, 3>({B, L, module_.out_dim()});
    c.hc.resize(0, module_.out_dim());
    if (c.comp.empty()) return y;
    const Matrix<T> xc = compress<T>(as_matrix(x), c.comp);
    c.hc = module_.forward(ctx, cmap(xc), c.comp, c.module);
    extract_add<T>(cmap(c.hc), c.comp, Router::gate(c.router).data(), as_matrix(y));
    return y;
  }

  Tensor3<T> backward(Context& ctx, const Tensor3<T>& dy, const Cache& c) {
    const Index B = c.x.dimension(0), L = c.x.dimension(1), D = c.x.dimension(2);
    Tensor3<T> dx = zeros<T, 3>({B, L, D});
    check_shape(dy, {B, L, module_.out_dim()}, "Sma::backward: dy");
    if (c.comp.empty()) return dx;
    Matrix<T> dhc;
    std::vector<T> dgate(static_cast<std::size_t>(B * L), T(0));
    extract_backward<T>(cmap(c.hc), c.comp, Router::gate(c.router).data(), as_matrix(dy), dhc, dgate.data());
    const Matrix<T> dxc = module_.backward(ctx, cmap(dhc), c.comp, c.module);
    compress_backward<T>(cmap(dxc), c.comp, as_matrix(dx));
    as_matrix(dx) += router_.backward(as_matrix(c.x), dgate, c.router);
    return dx;
  }

 private:
  Router router_;
  Module module_;
  RoutingSemantics semantics_ = RoutingSemantics::per_row;
  std::string router_prefix_ = "router.", module_prefix_ = "module.";
};

}  // namespace sma
