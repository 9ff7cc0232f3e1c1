// sma/cuda/compress.hpp: compress / extract on the device (the CUDA counterpart of sma/ops/compress.hpp), by stream
// compaction with CUB block scans. Host-callable; no CUDA header is included (definitions: cuda/compress/).
//
// WHAT
//   plan_compression   (B, L) activation mask -> the packed ragged plan, entirely on the device: per-row counts,
//                      row offsets (exclusive scan), for every slot its token b*L+t, original position t and
//                      key_valid flag, and for every token its slot (-1: none). Same semantics as sma::plan_compression (RoutingSemantics reference /
//                      per_row, the reference's uncompressed fallback when some row is fully active, S = 0 when
//                      nothing is active), but the number of slots S = offsets[B] STAYS ON THE DEVICE: nothing
//                      waits for the host, and every later kernel is launched for the upper bound B*L and reads S
//                      itself.
//   compress           xc[s] = x[token[s]]                                    (s < S)
//   compress_backward  dx[token[s]] += dxc[s]        (tokens are distinct, so the scatter-add needs no atomics)
//   extract_add        out[token[s]] += gate[token[s]] * hc[s]             for slots with key_valid[s]
//   extract_backward   dhc[s] = key_valid[s] ? gate[tok] * dout[tok] : 0,  dgate[tok] = <dout[tok], hc[s]>
//                      (dgate assigned for activated tokens only, as on the CPU)
// SHAPES (row-major float, device memory)
//   active (B, L) uint8 (nonzero = routed); x, dx, out, dout (B*L, D); gate, dgate (B*L);
//   xc, dxc, hc, dhc: (B*L, D) allocations of which rows [0, S) are read or written (rows >= S untouched).
// INTEGERS are 32-bit on the device (B*L < 2^31): offsets, tokens, positions.
// ERRORS: ValueError for bad sizes or null pointers, CudaError for failed launches. Kernels run asynchronously on
//   `stream` (a cudaStream_t passed as void*; nullptr = the legacy default stream).
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/buffer.hpp>

#include <cstdint>
#include <vector>

namespace sma::cuda {

/// Same order and meaning as sma::RoutingSemantics.
enum class CompressionSemantics : std::uint8_t { reference, per_row };

/// Non-owning view of a device compression plan (all device pointers). Arrays indexed by slot hold B*L entries,
/// of which the first S = offsets[B] are meaningful.
struct CompressionView {
  int batch = 0, length = 0;
  int* offsets = nullptr;              ///< B+1: row b owns slots [offsets[b], offsets[b+1])
  int* token = nullptr;                ///< B*L: flat token b*L + t of each slot
  int* positions = nullptr;            ///< B*L: original position t of each slot
  std::uint8_t* key_valid = nullptr;   ///< B*L: 1 when the slot's token is activated
  int* num_active = nullptr;           ///< B: activated tokens per row
  int* compressed = nullptr;           ///< 1 int: 1 = compressed, 0 = the reference's uncompressed fallback
  int* slot = nullptr;                 ///< B*L, by token: its slot, or -1 when the token has none (the inverse of
                                       ///< `token`, so per-token kernels can fuse extraction without a scatter)

  /// Upper bound of S: the row count to allocate for compressed tensors and to launch downstream kernels with.
  long long capacity() const { return static_cast<long long>(batch) * length; }
};

/// Owns the device arrays of a plan for a (batch, length) mask.
class DeviceCompression {
 public:
  DeviceCompression(int batch, int length)
      : batch_(check_dim(batch, "batch")), length_(check_dim(length, "length")),
        offsets_(static_cast<std::size_t>(batch) + 1), token_(slots()), positions_(slots()), key_valid_(slots()),
        num_active_(static_cast<std::size_t>(batch)), compressed_(1), slot_(slots()) {}

  CompressionView view() const {
    return {batch_,          length_,           offsets_.data(), token_.data(), positions_.data(),
            key_valid_.data(), num_active_.data(), compressed_.data(), slot_.data()};
  }
  int batch() const { return batch_; }
  int length() const { return length_; }

  // Host copies (they wait for `stream`): for tests, debugging and host-side consumers.
  std::vector<int> offsets(void* stream = nullptr) const { return offsets_.download(stream); }
  std::vector<int> token(void* stream = nullptr) const { return token_.download(stream); }
  std::vector<int> positions(void* stream = nullptr) const { return positions_.download(stream); }
  std::vector<std::uint8_t> key_valid(void* stream = nullptr) const { return key_valid_.download(stream); }
  std::vector<int> num_active(void* stream = nullptr) const { return num_active_.download(stream); }
  bool compressed(void* stream = nullptr) const { return compressed_.download(stream)[0] != 0; }
  std::vector<int> slot(void* stream = nullptr) const { return slot_.download(stream); }

 private:
  static int check_dim(int v, const char* name) {
    if (v < 0) throw ValueError(str_cat("DeviceCompression: ", name, " must be >= 0, got ", v));
    return v;
  }
  std::size_t slots() const { return static_cast<std::size_t>(batch_) * static_cast<std::size_t>(length_); }

  int batch_, length_;
  DeviceArray<int> offsets_, token_, positions_;
  DeviceArray<std::uint8_t> key_valid_;
  DeviceArray<int> num_active_, compressed_, slot_;
};

/// Fills `plan` from the (B, L) mask `active` (device). Asynchronous; S stays on the device.
void plan_compression(const std::uint8_t* active, CompressionSemantics semantics, const CompressionView& plan,
                      void* stream = nullptr);

/// xc[s, :] = x[token[s], :] for s < S. x (B*L, d), xc (B*L, d).
void compress(const float* x, int d, const CompressionView& plan, float* xc, void* stream = nullptr);

/// dx[token[s], :] += dxc[s, :] for s < S.
void compress_backward(const float* dxc, int d, const CompressionView& plan, float* dx, void* stream = nullptr);

/// out[token[s], :] += gate[token[s]] * hc[s, :] for s < S with key_valid[s].
void extract_add(const float* hc, int d, const CompressionView& plan, const float* gate, float* out,
                 void* stream = nullptr);

/// dhc[s, :] = key_valid[s] ? gate[tok] * dout[tok, :] : 0 and, for key_valid[s], dgate[tok] = <dout[tok], hc[s]>
/// (tok = token[s], s < S; other dgate entries untouched). Deterministic (fixed-order warp reduction).
void extract_backward(const float* hc, int d, const CompressionView& plan, const float* gate, const float* dout,
                      float* dhc, float* dgate, void* stream = nullptr);

}  // namespace sma::cuda
