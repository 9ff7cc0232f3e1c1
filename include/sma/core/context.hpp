// sma/core/context.hpp: what a forward/backward call needs besides its data: mode, randomness, threads, padding.
#pragma once

#include <sma/core/tensor.hpp>

#include <cstdint>
#include <random>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sma {

/// Per-call state shared by every layer of one forward/backward pass.
///
/// - `mode`: train (dropout on, BatchNorm uses batch statistics and updates running ones) or eval.
/// - `rng`: the seeded generator dropout draws from; `Context(mode, seed)` makes runs reproducible.
/// - `threads`: OpenMP threads for the layers' parallel loops (0 = OpenMP's default).
/// - `padding`: the batch's padding mask (B, L), 1 = padded, or nullptr. It describes the batch being processed,
///   so every layer of a stack sees the same one; layers that mix along the sequence honour it.
/// - `freeze_routing`: routers reuse the decisions already stored in the Cache they are given, instead of
///   recomputing them. Gradient checks use it so that finite differences never flip a discrete choice.
/// - `check_finite`: layers check their inputs for NaN/Inf and throw NumericError naming the tensor.
/// - `update_statistics`: in train mode, layers with running statistics (BatchNorm) update them in forward.
///   Gradient checks turn it off so repeated forwards see the same state.
/// - `save_for_backward`: false promises that backward will not be called with the Caches of this forward
///   (inference, like torch.no_grad()); layers that honour it keep only what the forward itself needs, so
///   memory stays small. Calling backward with such a Cache throws ValueError where a layer can tell.
struct Context {
  Mode mode = Mode::eval;
  std::mt19937_64 rng{0};
  int threads = 0;
  const Mask* padding = nullptr;
  bool freeze_routing = false;
  bool check_finite = false;
  bool update_statistics = true;
  bool save_for_backward = true;

  Context() = default;
  explicit Context(Mode m, std::uint64_t seed = 0) : mode(m), rng(seed) {}

  bool training() const { return mode == Mode::train; }

  /// The number of threads parallel loops should use.
  int num_threads() const {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    return 1;
#endif
  }

  /// Validates and returns the padding mask for a (B, L) batch, or nullptr when there is none.
  const Mask* padding_for(Index batch, Index length, const char* where) const {
    if (!padding) return nullptr;
    check_shape(*padding, {batch, length}, std::string(where) + ": padding mask");
    return padding;
  }
};

/// True when position `t` of batch row `b` is padding under `mask` (nullptr = no padding).
inline bool is_padding(const Mask* mask, Index b, Index t) { return mask && (*mask)(b, t) != 0; }

}  // namespace sma
