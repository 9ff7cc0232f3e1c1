// cuda/model/step_graph.cuh: a model's training step recorded once as a CUDA graph and replayed
// (include/sma/cuda/step_graph.hpp says when). The model supplies two keys per call: `shape`, everything that decides
// its buffers and the host-side arguments of its kernels (sizes and flags), and `key`, the shape plus the device
// pointers that the step reads its inputs from; whatever reallocates the model's buffers calls forget().
//
// WHY the first step at a shape runs plainly: it allocates the buffers (cudaMalloc may not be called while a stream
// is being captured), creates the cuBLAS handles' state and caches the bounded products; the captured step then
// only queues work. Every temporary of the step comes from cudaMallocAsync and is freed within it, so the capture
// turns them into the graph's own memory nodes; nothing in the step reads back from the device or synchronises
// (an attempt ends the capture with a CudaError naming the call, thanks to the thread-local capture mode).
#pragma once

#include <sma/cuda/seqboat_device.hpp>
#include <sma/cuda/step_graph.hpp>
#include <sma/core/error.hpp>

#include "../common/check.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace sma::cuda::detail {

class StepGraph {
 public:
  StepGraph() = default;
  ~StepGraph() { drop(); }
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  bool enabled() const { return enabled_; }
  void set_enabled(bool on) {
    if (!on) forget();
    enabled_ = on;
  }
  const StepGraphStats& stats() const { return stats_; }

  /// The model's buffers moved (a forward at another shape, a new optimiser): the graph's baked pointers are stale
  /// and the next step must run plainly again.
  void forget() {
    drop();
    warm_.clear();
  }

  /// Runs `body` (the whole step, queued on s) plainly, or captured then launched, or replays the graph.
  template <class Body>
  void run(cudaStream_t s, const std::vector<long long>& shape, const std::vector<long long>& key, Body&& body) {
    if (exec_ && key == key_) {
      SMA_CUDA_CHECK(cudaGraphLaunch(exec_, s));
      ++stats_.replays;
      return;
    }
    drop();
    if (shape != warm_) {
      warm_.clear();  // a throw below leaves it cold
      body();         // may call forget() (it reallocates for this shape)
      warm_ = shape;
      ++stats_.plain;
      return;
    }
    SMA_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      cudaStreamEndCapture(s, &graph);  // the capture may already be invalidated: its error is the one reported
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      warm_.clear();
      throw;
    }
    const cudaError_t ended = cudaStreamEndCapture(s, &graph);
    if (ended != cudaSuccess || !graph) {
      if (graph) cudaGraphDestroy(graph);
      warm_.clear();
      check(ended != cudaSuccess ? ended : cudaErrorStreamCaptureInvalidated,
            "cudaStreamEndCapture (the training step's capture)", __FILE__, __LINE__);
    }
    // cuBLAS records its workspace as memory nodes when none was set on a handle; should one of them outlive the
    // step, a relaunch frees it first instead of failing.
    const cudaError_t made = cudaGraphInstantiate(&exec_, graph, cudaGraphInstantiateFlagAutoFreeOnLaunch);
    cudaGraphDestroy(graph);
    if (made != cudaSuccess) {
      exec_ = nullptr;
      warm_.clear();
      SMA_CUDA_CHECK(made);
    }
    key_ = key;
    ++stats_.captures;
    SMA_CUDA_CHECK(cudaGraphLaunch(exec_, s));
  }

 private:
  void drop() {
    // An executable graph still running is freed when it completes.
    if (exec_) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
    key_.clear();
  }

  bool enabled_ = false;
  cudaGraphExec_t exec_ = nullptr;
  std::vector<long long> key_, warm_;
  StepGraphStats stats_;
};

/// A pointer as a key element.
inline long long key_of(const void* p) { return static_cast<long long>(reinterpret_cast<std::uintptr_t>(p)); }

/// What of a layer's settings its kernels take by value from the host (so a change must not replay a graph);
/// throws ValueError for a layer that reads S back to the host, which a graph cannot do.
inline void append_layer_shape(std::vector<long long>& k, const SeqBoatLayerDevice& l, const char* who, int index) {
  const SeqBoatDeviceConfig& c = l.config();
  if (c.host_compressed_length)
    throw ValueError(str_cat(who, ": layer ", index, " has host_compressed_length on (a wait for the host), which the "
                             "step graph cannot capture"));
  std::uint32_t shift = 0;
  std::memcpy(&shift, &c.router_shift, sizeof shift);
  k.insert(k.end(), {c.training, c.bf16_projections, c.attention.bf16, static_cast<long long>(shift)});
}

}  // namespace sma::cuda::detail
