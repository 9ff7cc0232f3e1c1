// Helpers of the CUDA test suite: device detection (the cases WARN and return without a GPU, so CI passes), the
// accuracy rule, and host<->device copies of Eigen matrices.
#pragma once

#include <catch2/catch.hpp>
#include <sma/core/param.hpp>
#include <sma/core/tensor.hpp>
#include <sma/cuda/bounded_gemm.hpp>
#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace sma::cuda_test {

// The tests run tiny products; the size rule of cuda::bounded_gemm would run all of them as plain cuBLAS calls, and
// the chunked graphs (and their bound by S) would go untested. So this binary chunks every product.
inline const bool kChunkEveryProduct = [] {
  cuda::set_bounded_gemm_min_gflop(0.0);
  return true;
}();

/// True when a CUDA device is usable; otherwise WARNs once per case (the caller returns).
inline bool device_or_skip() {
  if (cuda::device_count() > 0) return true;
  WARN("no CUDA device: CUDA case skipped");
  return false;
}

#define SMA_CUDA_TEST_REQUIRE_DEVICE() \
  do {                                 \
    if (!::sma::cuda_test::device_or_skip()) return; \
  } while (0)

/// max |a - b| over n elements (NaN anywhere counts as infinite).
template <class A, class B>
double max_abs_diff(const A* a, const B* b, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}

template <class A>
double max_abs(const A* a, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(a[i])));
  return m;
}

/// The FlashAttention rule (STYLE.md 2.8): the device's error against the double CPU path may be at most twice the
/// float CPU path's, plus an absolute floor relative to the tensor's magnitude.
struct Accuracy {
  double gpu = 0, cpu_float = 0, scale = 0, floor = 0;
  bool ok() const { return gpu <= 2 * cpu_float + floor; }
};

inline std::ostream& operator<<(std::ostream& os, const Accuracy& a) {
  return os << "gpu err " << a.gpu << ", cpu float err " << a.cpu_float << ", max |ref| " << a.scale << ", floor "
            << a.floor << (a.ok() ? " (ok)" : " (FAIL)");
}

template <class G>
Accuracy accuracy(const G* gpu, const float* cpu_float, const double* ref, std::size_t n, double rel_floor = 2e-6) {
  Accuracy a;
  a.gpu = max_abs_diff(gpu, ref, n);
  a.cpu_float = max_abs_diff(cpu_float, ref, n);
  a.scale = max_abs(ref, n);
  a.floor = rel_floor * std::max(a.scale, 1e-3);
  return a;
}

/// A (capacity, cols) device copy of the first rows of m; rows past m.rows() hold `fill` (NaN by default, so any
/// read of them poisons the result).
inline cuda::DeviceArray<float> upload_rows(const Matrix<float>& m, Index capacity,
                                            float fill = std::numeric_limits<float>::quiet_NaN()) {
  std::vector<float> h(static_cast<std::size_t>(capacity * m.cols()), fill);
  std::copy(m.data(), m.data() + m.size(), h.begin());
  return cuda::DeviceArray<float>(h);
}

/// Bit pattern used to pre-fill outputs, to prove that rows >= S are never written.
inline float sentinel() {
  float f;
  const std::uint32_t bits = 0x7f7f7f7fu;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline bool all_sentinel(const std::vector<float>& v, std::size_t from) {
  const float s = sentinel();
  for (std::size_t i = from; i < v.size(); ++i)
    if (std::memcmp(&v[i], &s, sizeof s) != 0) return false;
  return true;
}

inline bool all_finite(const std::vector<float>& v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// Every parameter of a layer or model by its official name (for comparing the device's copies with the CPU's).
template <class T, class Model>
std::map<std::string, Param<T>*> params_of(Model& model) {
  std::map<std::string, Param<T>*> out;
  for_each_param(model, [&](const std::string& name, Param<T>& p) { out[name] = &p; });
  return out;
}

}  // namespace sma::cuda_test
