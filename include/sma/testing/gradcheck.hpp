// sma/testing/gradcheck.hpp: finite-difference gradient check for any layer meeting docs/layer_contract.md.
//
// f(x, params) = sum(forward(x) .* g) with a fixed random g. The analytic gradient from backward(g) is compared
// with central differences for the input and for every trainable Param reached by visit_params. Besides the
// values it checks the contract itself:
//   - forward output and dx are finite (tests build with SMA_POISON_UNINITIALIZED, so unwritten elements are NaN);
//   - backward ADDS to Param::grad: grads are pre-filled with a sentinel, and a second backward must add again;
//   - the analytic gradient is not all zero (a vacuous pass).
// The first failure is reported by name, e.g. "ssm.delta[3]: analytic 0.41 numeric 0.39".
#pragma once

#include <sma/core/layer.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace sma::testing {

struct GradcheckOptions {
  double eps = 1e-6;             ///< step of the central difference
  double rtol = 1e-5;            ///< relative tolerance against max(|analytic|, |numeric|)
  double atol = 1e-7;            ///< absolute tolerance
  bool four_point = false;       ///< use the 4-point stencil (error O(eps^4)) instead of 2-point
  Index max_elements = 128;      ///< per tensor; above it a random sample that always has the first and last element
  std::uint64_t seed = 1234;     ///< for g and for the sampling
  Mode mode = Mode::eval;        ///< train mode exercises dropout with a fixed seed per forward
  const Mask* padding = nullptr; ///< padding mask handed to the layers through the Context
  bool check_input = true;       ///< also check dx (off for layers whose input is discrete)
  bool require_nonzero = true;   ///< fail when every analytic gradient is exactly zero
  /// Positions (b, t) whose outputs are excluded from f (e.g. padded positions whose outputs are meaningless).
  const Mask* output_mask = nullptr;
};

struct GradcheckResult {
  bool ok = true;
  std::string message;      ///< why it failed, or a summary
  std::string worst;        ///< name[index] of the worst element
  double worst_error = 0;   ///< |a - n| / (atol + rtol * max(|a|, |n|)); <= 1 passes
  double analytic = 0, numeric = 0;
  Index checked = 0;        ///< number of elements compared
};

inline std::ostream& operator<<(std::ostream& os, const GradcheckResult& r) {
  os << (r.ok ? "gradcheck ok" : "gradcheck FAILED") << ": " << r.message << " (worst " << r.worst << ": analytic "
     << r.analytic << " numeric " << r.numeric << ", error ratio " << r.worst_error << ", " << r.checked
     << " elements)";
  return os;
}

namespace detail {

inline std::vector<Index> sample_indices(Index n, Index cap, std::mt19937_64& rng) {
  std::vector<Index> idx;
  if (n <= cap) {
    for (Index i = 0; i < n; ++i) idx.push_back(i);
    return idx;
  }
  idx.push_back(0);
  idx.push_back(n - 1);
  std::uniform_int_distribution<Index> u(1, n - 2);
  while (static_cast<Index>(idx.size()) < cap) idx.push_back(u(rng));
  std::sort(idx.begin(), idx.end());
  idx.erase(std::unique(idx.begin(), idx.end()), idx.end());
  return idx;
}

}  // namespace detail

/// Runs the check on `layer` at input `x` (B, L, D). The layer's parameters are restored afterwards; its gradients
/// are left holding one backward's worth (g) so callers may inspect them.
template <class L>
GradcheckResult gradcheck(L& layer, const Tensor3<typename L::Scalar>& x, const GradcheckOptions& opt = {}) {
  static_assert(check_layer<L>());
  using T = typename L::Scalar;
  GradcheckResult res;

  auto make_ctx = [&]() {
    Context ctx(opt.mode, opt.seed);
    ctx.padding = opt.padding;
    ctx.freeze_routing = true;
    ctx.update_statistics = false;
    return ctx;
  };

  // Reference forward; its cache also fixes the routing for every perturbed forward.
  typename L::Cache cache0;
  Context ctx0 = make_ctx();
  const Tensor3<T> y = layer.forward(ctx0, x, cache0);
  for (Index i = 0; i < y.size(); ++i) {
    if (!std::isfinite(static_cast<double>(y.data()[i]))) {
      res.ok = false;
      res.message = str_cat("forward output has a non-finite value at flat index ", i, " of ",
                            shape_string(dims_of(y)), " (an element never written?)");
      return res;
    }
  }
  std::mt19937_64 rng(opt.seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Tensor3<T> g(y.dimensions());
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = static_cast<T>(nd(rng));
  if (opt.output_mask) {
    check_shape(*opt.output_mask, {y.dimension(0), y.dimension(1)}, "gradcheck: output_mask");
    for (Index b = 0; b < y.dimension(0); ++b)
      for (Index t = 0; t < y.dimension(1); ++t)
        if ((*opt.output_mask)(b, t))
          for (Index d = 0; d < y.dimension(2); ++d) g(b, t, d) = T(0);
  }

  Tensor3<T> xv = x;  // perturbed element by element
  auto objective = [&]() -> double {
    Context ctx = make_ctx();
    typename L::Cache c = cache0;
    const Tensor3<T> yy = layer.forward(ctx, xv, c);
    double f = 0;
    for (Index i = 0; i < yy.size(); ++i) f += static_cast<double>(yy.data()[i]) * static_cast<double>(g.data()[i]);
    return f;
  };

  // Analytic gradients, on top of a sentinel so that "assigns instead of adds" is caught.
  const T sentinel = T(0.25);
  for_each_param(layer, [&](const std::string&, Param<T>& p) {
    if (p.trainable()) std::fill(p.grad(), p.grad() + p.size(), sentinel);
  });
  Context ctxb = make_ctx();
  const Tensor3<T> dx = layer.backward(ctxb, g, cache0);
  if (opt.check_input) {
    check_shape(dx, {x.dimension(0), x.dimension(1), x.dimension(2)}, "gradcheck: dx returned by backward");
    for (Index i = 0; i < dx.size(); ++i) {
      if (!std::isfinite(static_cast<double>(dx.data()[i]))) {
        res.ok = false;
        res.message = str_cat("dx has a non-finite value at flat index ", i, " (an element never written?)");
        return res;
      }
    }
  }
  std::vector<std::vector<double>> analytic;
  for_each_param(layer, [&](const std::string&, Param<T>& p) {
    std::vector<double> a(static_cast<std::size_t>(p.size()));
    for (Index i = 0; i < p.size(); ++i) a[static_cast<std::size_t>(i)] = double(p.grad()[i]) - double(sentinel);
    analytic.push_back(std::move(a));
  });
  // Second backward: every trainable gradient must now be sentinel + 2 * analytic.
  {
    Context ctx2 = make_ctx();
    (void)layer.backward(ctx2, g, cache0);
    std::size_t k = 0;
    bool accumulates = true;
    std::string where;
    for_each_param(layer, [&](const std::string& name, Param<T>& p) {
      const auto& a = analytic[k++];
      if (!p.trainable()) return;
      for (Index i = 0; i < p.size() && accumulates; ++i) {
        const double want = double(sentinel) + 2 * a[static_cast<std::size_t>(i)];
        const double got = double(p.grad()[i]);
        if (std::abs(got - want) > 1e-6 * (1 + std::abs(want)) + (sizeof(T) < 8 ? 1e-3 : 0)) {
          accumulates = false;
          where = str_cat(name, "[", i, "]: expected ", want, " after two backwards, got ", got);
        }
      }
    });
    if (!accumulates) {
      res.ok = false;
      res.message = "backward must ADD to Param::grad (docs/layer_contract.md#backward): " + where;
      return res;
    }
  }

  bool any_nonzero = false;
  auto consider = [&](const std::string& name, Index i, double a, double n) {
    if (a != 0) any_nonzero = true;
    const double err = std::abs(a - n) / (opt.atol + opt.rtol * std::max(std::abs(a), std::abs(n)));
    ++res.checked;
    if (err > res.worst_error || res.worst.empty()) {
      res.worst_error = err;
      res.worst = str_cat(name, "[", i, "]");
      res.analytic = a;
      res.numeric = n;
    }
  };
  auto numeric_at = [&](T* slot) {
    const T saved = *slot;
    const double h = opt.eps;
    auto at = [&](double k) {
      *slot = static_cast<T>(double(saved) + k * h);
      return objective();
    };
    double n;
    if (opt.four_point)
      n = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h);
    else
      n = (at(1) - at(-1)) / (2 * h);
    *slot = saved;
    return n;
  };

  if (opt.check_input) {
    for (Index i : detail::sample_indices(xv.size(), opt.max_elements, rng))
      consider("x", i, double(dx.data()[i]), numeric_at(xv.data() + i));
  }
  std::size_t k = 0;
  for_each_param(layer, [&](const std::string& name, Param<T>& p) {
    const auto& a = analytic[k++];
    if (!p.trainable()) return;
    for (Index i : detail::sample_indices(p.size(), opt.max_elements, rng))
      consider(name, i, a[static_cast<std::size_t>(i)], numeric_at(p.data() + i));
  });
  // Leave one backward's worth of gradient in the layer.
  k = 0;
  for_each_param(layer, [&](const std::string&, Param<T>& p) {
    const auto& a = analytic[k++];
    if (p.trainable())
      for (Index i = 0; i < p.size(); ++i) p.grad()[i] = static_cast<T>(a[static_cast<std::size_t>(i)]);
  });

  if (res.worst_error > 1) {
    res.ok = false;
    res.message = "analytic and numeric gradients differ";
  } else if (opt.require_nonzero && !any_nonzero) {
    res.ok = false;
    res.message = "every analytic gradient is exactly zero (vacuous check)";
  } else {
    res.message = "all compared elements within tolerance";
  }
  return res;
}

}  // namespace sma::testing
