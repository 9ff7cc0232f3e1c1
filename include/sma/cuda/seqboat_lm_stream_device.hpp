// sma/cuda/seqboat_lm_stream_device.hpp: streaming decode of the causal SeqBoat LM on the device, for B independent
// streams (the device counterpart of sma::SeqBoatLmStreamer; definitions in cuda/model/seqboat_lm_stream.cu). Host
// class; no CUDA header is included.
//
// WHAT     step(tokens (B)) -> logits (B, V): stream b's next-token logits after its token, what
//          SeqBoatLmStreamer::step gives (and so what the full causal forward of the LM, per_row routing, gives at
//          that position), fp32. One step is the LM's own row passes on the B rows: the embedding lookup, per layer
//          a SeqBoatLayerStreamerDevice step (its state: EMA, the ring of activated keys and values) and the
//          feed-forward block, the final norm (pre-norm), and the tied head (one product with the embedding),
//          queued on one stream with no host wait.
//          generate(): greedy decoding, the argmax of each step's logits (ties to the lowest id, as sma::sample_token
//          at temperature 0) fed to the next step on the device; the tokens are read back once at the end.
// WEIGHTS  read in place from the SeqBoatLmDevice (never copied): a parameter changed on the device (an optimiser
//          step, a layer's router shift) is used by the next step. The LM must outlive the streamer and keep its
//          layers (a move of the SeqBoatLmDevice object itself is fine).
// GRAPH    set_graph(true): the whole step (every layer's included) is captured once as a CUDA graph (on a stream of
//          its own; the first step after the switch runs plainly, to warm cuBLAS up) and replayed on the caller's
//          stream; it is captured again when the tokens or logits pointer, a weight pointer or a router shift change.
//          A replay computes the same bits as the plain step.
// LIMITS   causal layers (an LM's are); evaluation mode whatever the LM's training switch (no dropout); fp32
//          whatever the bf16 switches; 1 <= B <= 65535. No padding: feed each stream its real tokens only.
//          Tokens outside [0, V): the host overloads throw before anything is queued; step(const int*) cannot throw
//          without a host wait, so it embeds such a token as zeros (the stream's state goes on from there) and
//          records the first one (the smallest stream index) until check_tokens() reports it or reset() clears it.
// THREADS  one streamer per host thread (it owns a cuBLAS handle, scratch and the graph).
// ERRORS   ValueError (batch, row index, null pointers, bad tokens, step count), ShapeError (host tokens of the
//          wrong size), NumericError (generate met a non-finite logit), CudaError (failed CUDA or cuBLAS call).
#pragma once

#include <sma/cuda/seqboat_lm_device.hpp>
#include <sma/cuda/seqboat_stream_device.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace sma::cuda {

class SeqBoatLmStreamerDevice {
 public:
  /// A streamer of `batch` fresh streams over `lm`.
  SeqBoatLmStreamerDevice(const SeqBoatLmDevice& lm, int batch);
  ~SeqBoatLmStreamerDevice();
  SeqBoatLmStreamerDevice(SeqBoatLmStreamerDevice&&) noexcept;
  SeqBoatLmStreamerDevice& operator=(SeqBoatLmStreamerDevice&&) noexcept;

  int batch() const;
  int vocab_size() const;
  const SeqBoatLmDevice& model() const;

  /// logits (B, V) for each stream's next token tokens (B); device pointers, queued on `stream`. Every stream
  /// advances by one token.
  void step(const int* tokens, float* logits, void* stream = nullptr);
  /// The same from and to host memory (tokens: B values, ShapeError otherwise; each in [0, V), ValueError naming
  /// the first one otherwise); waits for the result.
  std::vector<float> step(const std::vector<int>& tokens, void* stream = nullptr);
  /// Throws ValueError naming the first token outside [0, V) fed to step(const int*) since the last check or
  /// reset() (waits for `stream`); clears the record.
  void check_tokens(void* stream = nullptr);

  /// Greedy decoding: n_steps steps, the first fed `first` (B tokens: each stream's last prompt token; feed the
  /// rest of the prompts with step() before), each later one fed the argmax of the previous step's logits.
  /// Returns the (B, n_steps) argmax tokens, row-major; the last step's logits stay in logits(). Waits once, at
  /// the end.
  std::vector<int> generate(const std::vector<int>& first, int n_steps, void* stream = nullptr);
  /// The logits (B, V) of the last generate() or host step(), device memory.
  const float* logits() const;
  /// Their host copy, taken after the work queued on `stream`.
  std::vector<float> download_logits(void* stream = nullptr) const;

  /// Capture the step as a CUDA graph (see GRAPH above); off by default.
  void set_graph(bool on);
  bool graph() const;

  /// Stream b (every stream) back to position 0 with nothing remembered; queued on `stream`.
  void reset_row(int b, void* stream = nullptr);
  void reset(void* stream = nullptr);

  /// Layer i's streamer (its state: download(), position and activated counts per stream).
  const SeqBoatLayerStreamerDevice& layer_streamer(int i) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sma::cuda
