// sma/cuda/step_graph.hpp: what the opt-in step graph of SeqBoatModelDevice and SeqBoatLmDevice reports
// (set_step_graph). A training step is recorded once as a CUDA graph and then replayed with one cudaGraphLaunch,
// which removes the host's launch gaps between its hundreds of kernels. Host header, no CUDA header.
//
// The rule: the first train_step at a shape (batch, length, padding or not, the precision and mode flags) runs as
// usual, so that every buffer, cuBLAS handle and cached product exists; the next call with that shape captures
// the step and launches the graph; later calls with the same shape and the same device pointers (input, padding,
// labels) replay it. A change of pointer recaptures; a change of shape, of optimiser or of a flag runs one plain
// step first. The learning rate and AdamW's bias corrections are written to device memory before each launch,
// so they may change from step to step without a recapture.
#pragma once

namespace sma::cuda {

struct StepGraphStats {
  long long plain = 0;     ///< train_steps run without the graph while it was on (the first at each shape)
  long long captures = 0;  ///< graphs captured and instantiated
  long long replays = 0;   ///< cudaGraphLaunch of a graph captured by an earlier call
};

}  // namespace sma::cuda
