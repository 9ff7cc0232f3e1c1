// examples/alloc_counter.hpp: bytes of heap memory in use, counted at every malloc and free (alloc_counter.cpp
// wraps glibc's allocator; Eigen allocates through malloc too). Used by sma-demo to measure the peak memory of a
// forward/backward pass: peak live heap bytes, not RSS.
#pragma once

#include <cstddef>

namespace sma_demo {

/// True when the counting allocator is linked in and active (glibc only).
bool alloc_counter_active();
/// Heap bytes in use now (usable sizes of live blocks).
std::size_t heap_in_use();
/// The highest heap_in_use() since the last reset_heap_peak().
std::size_t heap_peak();
/// Starts a new peak at the current use.
void reset_heap_peak();

}  // namespace sma_demo
