// sma/compose/repeat.hpp: Repeat<N, Block>, N blocks of one type applied in order, held in a std::array (not N
// nested types, which is what blew up compilers on deep dlib networks).
#pragma once

#include <sma/compose/seq.hpp>
#include <sma/core/layer.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>

#include <array>
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

namespace sma {

namespace detail {

template <bool IsLayer, class Block>
constexpr bool check_repeat_if_layer() {
  // Block i's output feeds block i+1, so a block must keep its width; the numbers print as <Out, In, 0>.
  if constexpr (IsLayer)
    return assert_widths_match<Block::kOutDim, Block::kInDim, 0>();
  else
    return true;
}

}  // namespace detail

/// Repeat<N, Block>: block N-1 o ... o block 0, each block with its own parameters.
///
/// SHAPES    x (B, L, D) -> y (B, L, D'); Block::kOutDim must equal Block::kInDim where both are fixed.
/// PARAMS    block i's under "i." (PyTorch's nn.ModuleList naming): "0.fc1.weight", "1.fc1.weight", ...
/// CACHE     one cache per block.
/// GRADIENTS backward runs the blocks in reverse; each adds into its own parameters.
/// BUILDING  Repeat(prototype) copies one block N times (identical weights); Repeat(make) calls make(i) for
///           i = 0..N-1 (e.g. a different seed per block).
#if SMA_HAS_CONCEPTS
template <std::size_t N, Layer Block>
#else
template <std::size_t N, class Block>
#endif
class Repeat {
  static_assert(N >= 1, "sma::Repeat: N must be at least 1");
  static_assert(check_layer<Block>());
  static_assert(detail::check_repeat_if_layer<is_layer_v<Block>, Block>());

 public:
  static constexpr std::size_t kSize = N;
  using Scalar = typename Block::Scalar;
  static constexpr Index kInDim = Block::kInDim, kOutDim = Block::kOutDim;
  struct Cache {
    std::array<typename Block::Cache, N> children;
  };

  Repeat() = default;
  explicit Repeat(const Block& prototype) : Repeat(prototype, std::make_index_sequence<N>{}) {}
  template <class F, class = std::enable_if_t<std::is_invocable_r_v<Block, F&, std::size_t> &&
                                              !std::is_same_v<std::decay_t<F>, Block>>>
  explicit Repeat(F&& make) : Repeat(make, std::make_index_sequence<N>{}, 0) {}

  Block& operator[](std::size_t i) { return blocks_[i]; }
  const Block& operator[](std::size_t i) const { return blocks_[i]; }
  static constexpr std::size_t size() { return N; }

  template <class V>
  void visit_params(V&& v) {
    for (std::size_t i = 0; i < N; ++i) visit_child(v, std::to_string(i) + ".", blocks_[i]);
  }

  Tensor3<Scalar> forward(Context& ctx, const Tensor3<Scalar>& x, Cache& cache) const {
    Tensor3<Scalar> h = blocks_[0].forward(ctx, x, cache.children[0]);
    for (std::size_t i = 1; i < N; ++i) h = blocks_[i].forward(ctx, h, cache.children[i]);
    return h;
  }

  Tensor3<Scalar> backward(Context& ctx, const Tensor3<Scalar>& dy, const Cache& cache) {
    Tensor3<Scalar> g = blocks_[N - 1].backward(ctx, dy, cache.children[N - 1]);
    for (std::size_t i = N - 1; i-- > 0;) g = blocks_[i].backward(ctx, g, cache.children[i]);
    return g;
  }

 private:
  template <std::size_t... I>
  Repeat(const Block& prototype, std::index_sequence<I...>) : blocks_{{((void)I, prototype)...}} {}
  template <class F, std::size_t... I>
  Repeat(F& make, std::index_sequence<I...>, int) : blocks_{{make(I)...}} {}

  std::array<Block, N> blocks_;
};

}  // namespace sma
