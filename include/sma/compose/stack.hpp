// sma/compose/stack.hpp: Stack<Block>, a chain of a RUNTIME number of identical blocks (Repeat<N, Block> is the
// compile-time version). Checkpoint names are "0.", "1.", ... under the stack's own prefix, like torch's
// nn.ModuleList, so `seq_layers.3.mx_proj.weight` comes out of a SeqBoatModel.
#pragma once

#include <sma/core/layer.hpp>

#include <string>
#include <utility>
#include <vector>

namespace sma {

template <class Block>
class Stack {
  static_assert(check_layer<Block>());

 public:
  using Scalar = typename Block::Scalar;
  using Cache = std::vector<typename Block::Cache>;
  static constexpr Index kInDim = Block::kInDim;
  static constexpr Index kOutDim = Block::kOutDim;

  Stack() = default;
  /// `count` blocks, each made by `make(i)` (so blocks can differ in seed or configuration).
  template <class Make>
  Stack(Index count, Make&& make) {
    if (count < 0) throw ValueError(str_cat("Stack: negative block count ", count));
    blocks_.reserve(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i) blocks_.push_back(make(i));
  }

  Index size() const { return static_cast<Index>(blocks_.size()); }
  Block& operator[](Index i) { return blocks_.at(static_cast<std::size_t>(i)); }
  const Block& operator[](Index i) const { return blocks_.at(static_cast<std::size_t>(i)); }
  auto begin() { return blocks_.begin(); }
  auto end() { return blocks_.end(); }

  template <class V>
  void visit_params(V&& v) {
    for (std::size_t i = 0; i < blocks_.size(); ++i) visit_child(v, std::to_string(i) + ".", blocks_[i]);
  }

  Tensor3<Scalar> forward(Context& ctx, const Tensor3<Scalar>& x, Cache& cache) const {
    cache.resize(blocks_.size());
    Tensor3<Scalar> h = x;
    for (std::size_t i = 0; i < blocks_.size(); ++i) h = blocks_[i].forward(ctx, h, cache[i]);
    return h;
  }

  Tensor3<Scalar> backward(Context& ctx, const Tensor3<Scalar>& dy, const Cache& cache) {
    if (cache.size() != blocks_.size())
      throw ValueError(str_cat("Stack::backward: cache holds ", cache.size(), " blocks, the stack has ",
                               blocks_.size(), " (was forward called with this cache?)"));
    Tensor3<Scalar> d = dy;
    for (std::size_t i = blocks_.size(); i-- > 0;) d = blocks_[i].backward(ctx, d, cache[i]);
    return d;
  }

 private:
  std::vector<Block> blocks_;
};

}  // namespace sma
