// sma/cuda/seqboat_stream.hpp: SeqBoatLayerStreamerDevice (sma/cuda/seqboat_stream_device.hpp, the contract) with its
// state as the CPU streamer's SeqBoatLayerState<float>, so that a stream can move between the CPU and the device
// (and be saved with SeqBoatLayerStreamer::save_state). No CUDA header is included.
#pragma once

#include <sma/core/error.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_stream_device.hpp>
#include <sma/models/seqboat_stream.hpp>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace sma::cuda {

inline SeqBoatLayerState<float> SeqBoatLayerStreamerDevice::state(void* stream) const {
  const StreamStateArrays a = download(stream);
  const SeqBoatDeviceConfig& c = layer().config();
  const Index B = batch(), D = c.embed_dim, N = c.ndim, K = c.truncation, W = c.attention.window, Z = c.zdim,
              H = c.hdim;
  SeqBoatLayerState<float> st;
  auto fill = [](auto& t, const auto& v) { std::copy(v.begin(), v.end(), t.data()); };
  st.ema = Tensor3<float>(B, D, N);
  fill(st.ema, a.ema);
  st.ema_history = Tensor3<float>(B, K, D);
  fill(st.ema_history, a.ema_history);
  st.keys = Tensor3<float>(B, W, Z);
  fill(st.keys, a.keys);
  st.values = Tensor3<float>(B, W, H);
  fill(st.values, a.values);
  st.key_positions = Tensor2<std::int64_t>(B, W);
  fill(st.key_positions, a.key_positions);
  st.position = a.position;
  st.activated = a.activated;
  st.last_active = a.last_active;
  st.last_gate = a.last_gate;
  return st;
}

inline void SeqBoatLayerStreamerDevice::set_state(const SeqBoatLayerState<float>& st, void* stream) {
  if (st.batch() != batch())
    throw ShapeError(str_cat("SeqBoatLayerStreamerDevice::set_state: the state has ", st.batch(),
                             " streams, the streamer ", batch()));
  const SeqBoatDeviceConfig& c = layer().config();
  const Index B = batch(), D = c.embed_dim, W = c.attention.window;
  const std::string where = "SeqBoatLayerStreamerDevice::set_state: ";
  check_shape(st.ema, {B, D, c.ndim}, where + "state.ema (B, D, N)");
  check_shape(st.ema_history, {B, c.truncation, D}, where + "state.ema_history (B, truncation, D)");
  check_shape(st.keys, {B, W, c.zdim}, where + "state.keys (B, W, Z)");
  check_shape(st.values, {B, W, c.hdim}, where + "state.values (B, W, H)");
  check_shape(st.key_positions, {B, W}, where + "state.key_positions (B, W)");
  auto vec = [](const auto& t) {
    using S = std::remove_const_t<std::remove_reference_t<decltype(*t.data())>>;
    return std::vector<S>(t.data(), t.data() + t.size());
  };
  StreamStateArrays a;
  a.ema = vec(st.ema);
  a.ema_history = vec(st.ema_history);
  a.keys = vec(st.keys);
  a.values = vec(st.values);
  a.key_positions = vec(st.key_positions);
  a.position = st.position;
  a.activated = st.activated;
  a.last_active = st.last_active;
  a.last_gate = st.last_gate;
  upload(a, stream);  // checks every size against this streamer's layer
}

}  // namespace sma::cuda
