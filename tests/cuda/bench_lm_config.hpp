// The causal LM that the device LM benchmarks time (training step: bench_cuda_lm.cpp; streaming decode:
// bench_cuda_lm_stream.cpp), so that their figures in docs/benchmarks.md describe one model.
#pragma once

#include <sma/models/lm.hpp>

namespace sma::cuda_bench {

/// V 256, D 256, H 512, Z 128, N 16, feed-forward 512, 4 layers, window 256.
inline SeqBoatLmConfig bench_lm_config(int max_positions = 1024) {
  SeqBoatLmConfig c;
  c.vocab_size = 256;
  c.embed_dim = 256;
  c.hidden_dim = 512;
  c.zdim = 128;
  c.ndim = 16;
  c.ffn_hidden_dim = 512;
  c.layers = 4;
  c.window_size = 256;
  c.max_positions = max_positions;
  return c;
}

}  // namespace sma::cuda_bench
