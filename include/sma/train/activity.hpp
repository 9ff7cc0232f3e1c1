// sma/train/activity.hpp: how many tokens each SeqBoat layer routed to its attention unit in the last forward.
//
// The trainer reports the activation density per layer (activated / real tokens). Counts, not ratios, are kept so
// that the shards of a data-parallel step, or the batches of an evaluation, add up exactly.
//
// A model takes part by providing an overload (found by ADL or in sma::train)
//   void count_activations(const Model&, const typename Model::Cache&, const Mask* padding, ActivityCounts&);
// Overloads for SeqBoatModel, TokenClassifier and Stack<SeqBoatLayer> are here. Any other model whose Cache has a
// member `layers` of type std::vector<SeqBoatLayer<T>::Cache> (SeqBoatLm, for one) is counted from it; models with
// neither report no densities.
#pragma once

#include <sma/compose/stack.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/token_classifier.hpp>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma::train {

/// Per layer: activated tokens and real (non-padded) tokens.
struct ActivityCounts {
  std::vector<Index> active, real;

  bool empty() const { return active.empty(); }
  std::size_t layers() const { return active.size(); }
  void clear() {
    active.clear();
    real.clear();
  }
  /// Adds `o` layer by layer (sizes must agree unless one side is empty).
  void add(const ActivityCounts& o) {
    if (o.empty()) return;
    if (empty()) {
      *this = o;
      return;
    }
    if (o.layers() != layers())
      throw ValueError(str_cat("ActivityCounts::add: ", o.layers(), " layers added to ", layers()));
    for (std::size_t i = 0; i < layers(); ++i) {
      active[i] += o.active[i];
      real[i] += o.real[i];
    }
  }
  /// activated / real tokens of layer i (0 when it saw no token).
  double density(std::size_t i) const { return real.at(i) ? double(active.at(i)) / double(real.at(i)) : 0.0; }
  std::vector<double> densities() const {
    std::vector<double> d(layers());
    for (std::size_t i = 0; i < layers(); ++i) d[i] = density(i);
    return d;
  }
};

/// Counts of one SeqBoatLayer forward.
template <class T>
void count_layer_activations(const typename SeqBoatLayer<T>::Cache& c, const Mask* padding, Index& active, Index& real) {
  active = real = 0;
  for (Index b = 0; b < c.batch; ++b)
    for (Index t = 0; t < c.length; ++t) {
      if (is_padding(padding, b, t)) continue;
      ++real;
      active += c.router.active(b, t) ? 1 : 0;
    }
}

template <class T>
void count_activations(const Stack<SeqBoatLayer<T>>&, const typename Stack<SeqBoatLayer<T>>::Cache& c,
                       const Mask* padding, ActivityCounts& out) {
  out.active.assign(c.size(), 0);
  out.real.assign(c.size(), 0);
  for (std::size_t i = 0; i < c.size(); ++i) count_layer_activations<T>(c[i], padding, out.active[i], out.real[i]);
}

template <class T>
void count_activations(const SeqBoatModel<T>& m, const typename SeqBoatModel<T>::Cache& c, const Mask* padding,
                       ActivityCounts& out) {
  count_activations(m.layers(), c.layers, padding, out);
}

template <class T>
void count_activations(const TokenClassifier<T>& m, const typename TokenClassifier<T>::Cache& c, const Mask* padding,
                       ActivityCounts& out) {
  count_activations(m.model(), c.model, padding, out);
}

namespace detail {

template <class M, class = void>
struct has_count_activations : std::false_type {};
template <class M>
struct has_count_activations<M, std::void_t<decltype(count_activations(
                                    std::declval<const M&>(), std::declval<const typename M::Cache&>(),
                                    std::declval<const Mask*>(), std::declval<ActivityCounts&>()))>>
    : std::true_type {};

template <class M, class = void>
struct has_seqboat_layer_caches : std::false_type {};
template <class M>
struct has_seqboat_layer_caches<M, std::void_t<decltype(std::declval<const typename M::Cache&>().layers)>>
    : std::is_same<std::decay_t<decltype(std::declval<const typename M::Cache&>().layers)>,
                   std::vector<typename SeqBoatLayer<typename M::Scalar>::Cache>> {};

}  // namespace detail

/// The counts of `model`'s last forward (empty for a model that has neither an overload nor SeqBoat layer caches).
template <class Model>
ActivityCounts activity_of(const Model& model, const typename Model::Cache& cache, const Mask* padding) {
  ActivityCounts out;
  if constexpr (detail::has_count_activations<Model>::value) {
    count_activations(model, cache, padding, out);
  } else if constexpr (detail::has_seqboat_layer_caches<Model>::value) {
    using T = typename Model::Scalar;
    out.active.assign(cache.layers.size(), 0);
    out.real.assign(cache.layers.size(), 0);
    for (std::size_t i = 0; i < cache.layers.size(); ++i)
      count_layer_activations<T>(cache.layers[i], padding, out.active[i], out.real[i]);
  }
  return out;
}

}  // namespace sma::train
