// sma/core/index.hpp: the index type, the Dynamic width marker and the small enums every layer shares.
#pragma once

#include <sma/config.hpp>

#include <cstddef>
#include <cstdint>

namespace sma {

/// Signed index type for every size and offset (Eigen's convention).
using Index = std::ptrdiff_t;

/// A width template parameter equal to `Dynamic` is a runtime value (Eigen's pattern). Any other value fixes the
/// width at compile time and is checked against the runtime configuration.
inline constexpr Index Dynamic = -1;

/// Direction of sequence mixing: `causal` looks only back, `bidirectional` looks both ways.
enum class Direction : std::uint8_t { causal, bidirectional };

/// Train mode enables dropout and batch statistics; eval mode uses running statistics and no dropout.
enum class Mode : std::uint8_t { train, eval };

inline const char* to_string(Direction d) { return d == Direction::causal ? "causal" : "bidirectional"; }
inline const char* to_string(Mode m) { return m == Mode::train ? "train" : "eval"; }

}  // namespace sma
