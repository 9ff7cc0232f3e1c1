// sma/cuda/seqboat_stream_device.hpp: streaming decode of one causal SeqBoat layer on the device, for B independent
// streams (the device counterpart of sma::SeqBoatLayerStreamer; definitions in cuda/seqboat/seqboat_stream.cu). Host
// class; no CUDA header is included. sma/cuda/seqboat_stream.hpp adds the copies to and from the CPU's
// SeqBoatLayerState.
//
// WHAT     step(x_t (B, D)) -> y_t (B, D): what SeqBoatLayerStreamer::step gives (and so what the full causal forward
//          under RoutingSemantics::per_row gives at that position), fp32, from a state kept on the device:
//            EMA state (B, D, N); with an EMA truncation K, the last K EMA inputs (B, K, D);
//            the ring of the last W activated tokens' keys (rotated for rotary) (B, W, Z), values (B, W, H) and
//            original positions (B, W); per stream: tokens consumed, tokens activated, the last decision and gate.
//          A step is a few small kernels and three cuBLAS products on the B rows, queued on one stream with no host
//          wait: the router's decisions stay on the device and every kernel reads them per row (an inactive token
//          skips the attention and leaves the ring as it is). mx_proj and h_proj run on all B rows.
// WEIGHTS  read in place from the SeqBoatLayerDevice (never copied), at every step: a parameter changed on the
//          device (an optimiser step, set_router_shift) is used by the next step. The layer must outlive the streamer
//          and stay at the same address.
// GRAPH    set_graph(true): the step is captured once as a CUDA graph (on a stream of its own) and replayed on the
//          caller's stream; it is captured again whenever x, y or a weight pointer or the router shift change.
// LIMITS   causal layers; evaluation mode whatever the layer's training switch (batchnorm uses its running
//          statistics, there is no dropout); fp32 whatever the layer's bf16 switches; 1 <= B <= 65535.
//          No padding: feed each stream its real tokens only.
// THREADS  one streamer per host thread (it owns a cuBLAS handle, scratch and the graph).
// ERRORS   ValueError (configuration, batch, row index, graph without a device), ShapeError (state or host x_t of
//          the wrong size), CudaError (failed CUDA or cuBLAS call).
#pragma once

#include <sma/cuda/seqboat_device.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace sma {
template <class T>
struct SeqBoatLayerState;
}  // namespace sma

namespace sma::cuda {

/// Host copies of a device stream state, in SeqBoatLayerState's layouts (row-major, batch first).
struct StreamStateArrays {
  std::vector<float> ema;                  ///< (B, D, N)
  std::vector<float> ema_history;          ///< (B, K, D)
  std::vector<float> keys;                 ///< (B, W, Z)
  std::vector<float> values;               ///< (B, W, H)
  std::vector<std::int64_t> key_positions; ///< (B, W)
  std::vector<std::int64_t> position;      ///< (B)
  std::vector<std::int64_t> activated;     ///< (B)
  std::vector<std::uint8_t> last_active;   ///< (B)
  std::vector<float> last_gate;            ///< (B)
};

class SeqBoatLayerStreamerDevice {
 public:
  /// A streamer of `batch` fresh streams over `layer` (see the file comment for what the layer must allow).
  SeqBoatLayerStreamerDevice(const SeqBoatLayerDevice& layer, int batch);
  ~SeqBoatLayerStreamerDevice();
  SeqBoatLayerStreamerDevice(SeqBoatLayerStreamerDevice&&) noexcept;
  SeqBoatLayerStreamerDevice& operator=(SeqBoatLayerStreamerDevice&&) noexcept;

  int batch() const;
  const SeqBoatLayerDevice& layer() const;

  /// y (B, D) = the layer's output for each stream's next token x (B, D); device pointers, queued on `stream`.
  /// x and y may not overlap. The state advances by one token per stream.
  void step(const float* x, float* y, void* stream = nullptr);
  /// The same from and to host memory (x: B*D values, ShapeError otherwise); waits for the result.
  std::vector<float> step(const std::vector<float>& x, void* stream = nullptr);

  /// Capture the step as a CUDA graph (see GRAPH above); off by default.
  void set_graph(bool on);
  bool graph() const;
  /// What a captured step bakes in besides x, y and the streamer's own buffers (the layer's weight pointers and its
  /// router shift), as bytes: a caller that captures step() inside a graph of its own (with set_graph off) captures
  /// again when they change.
  std::vector<unsigned char> capture_key() const;

  /// Stream b (every stream) back to position 0 with nothing remembered; queued on `stream`.
  void reset_row(int b, void* stream = nullptr);
  void reset(void* stream = nullptr);

  /// Host copies of the state, taken after the work queued on `stream`.
  StreamStateArrays download(void* stream = nullptr) const;
  /// Replaces the state (every array of its exact size, ShapeError otherwise; 0 <= activated <= position per row,
  /// ValueError otherwise); completed when the call returns.
  void upload(const StreamStateArrays& st, void* stream = nullptr);

  /// The CPU streamer's state type (sma/cuda/seqboat_stream.hpp defines these two).
  SeqBoatLayerState<float> state(void* stream = nullptr) const;
  void set_state(const SeqBoatLayerState<float>& st, void* stream = nullptr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
