// examples/alloc_counter.cpp: a counting wrapper around glibc's malloc family (see alloc_counter.hpp).
//
// Defining malloc & co. in the executable replaces glibc's for the whole process (glibc supports this); each
// wrapper forwards to glibc's own implementation (__libc_malloc, ...) and adds or subtracts the block's usable size.
// Every allocation entry point is wrapped, so a block is always counted by the same size at both ends.
#include "alloc_counter.hpp"

#if defined(__GLIBC__)
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <malloc.h>

extern "C" {
void* __libc_malloc(std::size_t);
void __libc_free(void*);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* __libc_valloc(std::size_t);
void* __libc_pvalloc(std::size_t);
}

namespace {

std::atomic<std::int64_t> g_in_use{0};
std::atomic<std::int64_t> g_peak{0};

inline void on_alloc(void* p) {
  if (!p) return;
  const std::int64_t now = g_in_use.fetch_add(static_cast<std::int64_t>(malloc_usable_size(p)), std::memory_order_relaxed) +
                           static_cast<std::int64_t>(malloc_usable_size(p));
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}
inline void on_free(void* p) {
  if (p) g_in_use.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}

}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  void* p = __libc_malloc(n);
  on_alloc(p);
  return p;
}
void free(void* p) {
  on_free(p);
  __libc_free(p);
}
void* calloc(std::size_t n, std::size_t k) {
  void* p = __libc_calloc(n, k);
  on_alloc(p);
  return p;
}
void* realloc(void* old, std::size_t n) {
  const std::size_t before = old ? malloc_usable_size(old) : 0;
  void* p = __libc_realloc(old, n);
  if (p) {
    g_in_use.fetch_sub(static_cast<std::int64_t>(before), std::memory_order_relaxed);
    on_alloc(p);
  } else if (n == 0 && old) {
    g_in_use.fetch_sub(static_cast<std::int64_t>(before), std::memory_order_relaxed);  // realloc(p, 0) freed p
  }
  return p;
}
void* reallocarray(void* old, std::size_t n, std::size_t k) {
  if (k != 0 && n > static_cast<std::size_t>(-1) / k) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(old, n * k);
}
void* memalign(std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  on_alloc(p);
  return p;
}
void* aligned_alloc(std::size_t align, std::size_t n) { return memalign(align, n); }
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  if (align % sizeof(void*) != 0 || (align & (align - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(align, n);
  if (!p) return ENOMEM;
  on_alloc(p);
  *out = p;
  return 0;
}
void* valloc(std::size_t n) {
  void* p = __libc_valloc(n);
  on_alloc(p);
  return p;
}
void* pvalloc(std::size_t n) {
  void* p = __libc_pvalloc(n);
  on_alloc(p);
  return p;
}
}

namespace sma_demo {
bool alloc_counter_active() { return true; }
std::size_t heap_in_use() { return static_cast<std::size_t>(std::max<std::int64_t>(0, g_in_use.load())); }
std::size_t heap_peak() { return static_cast<std::size_t>(std::max<std::int64_t>(0, g_peak.load())); }
void reset_heap_peak() { g_peak.store(g_in_use.load()); }
}  // namespace sma_demo

#else

namespace sma_demo {
bool alloc_counter_active() { return false; }
std::size_t heap_in_use() { return 0; }
std::size_t heap_peak() { return 0; }
void reset_heap_peak() {}
}  // namespace sma_demo

#endif
