// A small causal SeqBoat layer and inputs whose routing is chosen per stream, for the device streamer's tests
// (test_cuda_stream.cpp) and its host emulation (emulation/emulate_stream.cpp). CPU code only.
//
// The router is made to read one channel: channel 0 of the EMA output is omega_0 xin_0 = xin_0 (its EMA kernel rows
// are zeroed), and the two router logits differ by 10 silu(mx_0), so a token is activated exactly when its
// (normalised) channel 0 is positive. Inputs then steer each stream: row 0 never activates (x_0 <= -2), row 1
// always (x_0 >= 2), further rows at random (x_0 = +-(2 + |noise|)); the margin stays wide enough that float
// rounding cannot flip a decision.
#pragma once

#include <sma/core/param.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/testing/random.hpp>

#include <cmath>
#include <random>
#include <string>

namespace sma::stream_test {

struct StreamCase {
  const char* name;
  ops::AttentionActivation act;
  ops::PositionEncoding pos;
  Index window;
  Index truncation;
  bool prenorm;
  NormType norm;
  unsigned seed;
};

inline SeqBoatLayerConfig stream_config(const StreamCase& k) {
  SeqBoatLayerConfig c;
  c.embed_dim = 16;
  c.zdim = 8;
  c.hdim = 12;
  c.ndim = 3;
  c.direction = Direction::causal;
  c.attention_activation = k.act;
  c.rel_pos = k.pos;
  c.window_size = k.window;
  c.truncation = k.truncation;
  c.max_positions = 16;  // shorter than the streams: the simple bias clamps
  c.prenorm = k.prenorm;
  c.norm_type = k.norm;
  c.routing = RoutingSemantics::per_row;
  return c;
}

template <class T>
void steer_router(SeqBoatLayer<T>& layer, std::uint64_t seed) {
  testing::randomize_params(layer, seed, 0.4);
  const Index D = layer.config().embed_dim, N = layer.config().ndim;
  for_each_param(layer, [&](const std::string& name, Param<T>& p) {
    if (name == "norm.norm.weight") {
      p.vec().array() += T(1);
      p.data()[0] = T(1);
    } else if (name == "norm.norm.bias") {
      p.data()[0] = T(0);
    } else if (name == "ssm.gamma") {
      for (Index n = 0; n < N; ++n) p.data()[n] = T(0);  // channel 0: no EMA memory
    } else if (name == "ssm.omega") {
      p.data()[0] = T(1);
    } else if (name == "hx_proj.weight") {
      for (Index j = 0; j < 2 * D; ++j) p.data()[j] = T(0);
      p.data()[D] = T(10);  // logit 1 - logit 0 = 10 silu(mx_0)
    } else if (name == "hx_proj.bias") {
      p.data()[0] = T(0);
      p.data()[1] = T(0);
    } else if (name == "q_router.temp") {
      p.data()[0] = T(0);
    }
  });
}

/// x (B, L, D): row 0 never routed, row 1 always, the others at random.
template <class T>
Tensor3<T> steered_input(Index B, Index L, Index D, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Tensor3<T> x(B, L, D);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < L; ++t) {
      for (Index d = 1; d < D; ++d) x(b, t, d) = T(nd(rng));
      const double m = 2.0 + std::abs(nd(rng));
      const double sign = b == 0 ? -1.0 : b == 1 ? 1.0 : (nd(rng) > 0 ? 1.0 : -1.0);
      x(b, t, 0) = T(sign * m);
    }
  return x;
}

}  // namespace sma::stream_test
