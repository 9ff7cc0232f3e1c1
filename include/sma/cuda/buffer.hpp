// sma/cuda/buffer.hpp: RAII owners of device memory and CUDA streams, usable from host code that never sees a CUDA
// header (definitions in cuda/common/buffer.cu). Memory is plain device memory (cudaMalloc): never managed memory,
// so every host<->device transfer is an explicit upload()/download().
//
// WHAT
//   DeviceBuffer    n bytes of device memory, freed by the destructor; move-only.
//   DeviceArray<T>  a typed DeviceBuffer of n elements with vector-style upload/download (T trivially copyable).
//   Stream          a CUDA stream created non-blocking, destroyed by the destructor; handle() is the opaque
//                   `void*` (a cudaStream_t) that the sma::cuda op functions take. nullptr there = legacy stream.
// ERRORS
//   Every failed CUDA call throws sma::cuda::CudaError naming the call (out of memory, no device, ...).
//   Size mismatches in upload/download throw sma::ShapeError.
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/error.hpp>

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

namespace sma::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  /// cudaMalloc(bytes); 0 bytes allocates nothing (data() == nullptr).
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const noexcept { return ptr_; }
  std::size_t bytes() const noexcept { return bytes_; }

  /// Copies `bytes` bytes from host memory to the start of the buffer (bytes <= this->bytes()). With a stream the
  /// copy is ordered on it; either way it has completed when the call returns.
  void upload(const void* src, std::size_t bytes, void* stream = nullptr);
  /// Copies the first `bytes` bytes of the buffer to host memory; completed when the call returns.
  void download(void* dst, std::size_t bytes, void* stream = nullptr) const;
  /// Sets every byte to `value` (cudaMemsetAsync on `stream`, not waited for).
  void fill_bytes(int value, void* stream = nullptr);

 private:
  void release() noexcept;
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

template <class T>
class DeviceArray {
  static_assert(std::is_trivially_copyable<T>::value, "sma::cuda::DeviceArray<T>: T must be trivially copyable");

 public:
  DeviceArray() = default;
  explicit DeviceArray(std::size_t n) : buf_(n * sizeof(T)), n_(n) {}
  /// Allocates v.size() elements and uploads v.
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) { upload(v); }

  T* data() const noexcept { return static_cast<T*>(buf_.data()); }
  std::size_t size() const noexcept { return n_; }

  /// v.size() must equal size().
  void upload(const std::vector<T>& v, void* stream = nullptr) {
    if (v.size() != n_)
      throw ShapeError(str_cat("DeviceArray::upload: ", v.size(), " host elements for a device array of ", n_));
    buf_.upload(v.data(), n_ * sizeof(T), stream);
  }
  std::vector<T> download(void* stream = nullptr) const {
    std::vector<T> v(n_);
    buf_.download(v.data(), n_ * sizeof(T), stream);
    return v;
  }
  void fill_bytes(int value, void* stream = nullptr) { buf_.fill_bytes(value, stream); }

 private:
  DeviceBuffer buf_;
  std::size_t n_ = 0;
};

class Stream {
 public:
  /// cudaStreamCreateWithFlags(cudaStreamNonBlocking).
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      release();
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  /// The cudaStream_t, as the opaque handle the op functions take.
  void* handle() const noexcept { return s_; }
  /// Waits for all work queued on the stream; throws CudaError if any of it failed.
  void synchronize() const;

 private:
  void release() noexcept;
  void* s_ = nullptr;
};

/// Waits for the whole device (cudaDeviceSynchronize); throws CudaError on a pending asynchronous error.
void device_synchronize();

/// Elapsed milliseconds of `fn` queued on `stream`, measured with two CUDA events around it (for benchmarks).
class EventTimer {
 public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(void* stream = nullptr);
  /// Records the stop event, waits for it, returns milliseconds since start().
  float stop(void* stream = nullptr);

 private:
  void* start_ = nullptr;
  void* stop_ = nullptr;
};

}  // namespace sma::cuda
