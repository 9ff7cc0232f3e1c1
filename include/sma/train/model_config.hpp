// sma/train/model_config.hpp: SeqBoatModelConfig <-> JSON, complete (every field, ours included), for checkpoint
// metadata: a checkpoint says which model it holds, and a resumed run can check that it builds the same one.
//
// The keys are the reference's constructor arguments (so `SeqBoatModelConfig::from_reference_json` reads the
// result too), plus the fields the reference lacks: "routing", "ema_algo", "router_shift".
#pragma once

#include <sma/models/seqboat.hpp>

#include <nlohmann/json.hpp>

#include <string>

namespace sma::train {

inline nlohmann::json to_json(const SeqBoatModelConfig& c) {
  nlohmann::json j;
  j["d_input"] = c.d_input;
  j["d_output"] = c.d_output;
  j["d_model"] = c.d_model;
  j["n_layers"] = c.n_layers;
  j["dropout"] = c.dropout;
  j["prenorm"] = c.prenorm;
  j["max_positions"] = c.max_positions;
  j["d_qk"] = c.d_qk;
  j["d_ema"] = c.d_ema;
  j["mem_size"] = c.mem_size;
  j["bidirectional"] = c.bidirectional;
  j["init_temp_scale"] = c.init_temp_scale;
  j["norm_type"] = to_string(c.norm_type);
  j["attention_activation"] = ops::to_string(c.attention_activation);
  if (c.rel_pos != ops::PositionEncoding::simple && c.rel_pos != ops::PositionEncoding::rotary)
    throw ValueError(str_cat("to_json(SeqBoatModelConfig): rel_pos ", ops::to_string(c.rel_pos),
                             " has no reference name (expected simple or rotary)"));
  j["rel_pos_bias"] = ops::to_string(c.rel_pos);
  j["routing"] = c.routing == RoutingSemantics::reference ? "reference" : "per_row";
  j["ema_algo"] = to_string(c.ema_algo);
  j["router_shift"] = c.router_shift;
  return j;
}

inline EmaAlgo parse_ema_algo(const std::string& s) {
  for (EmaAlgo a : {EmaAlgo::automatic, EmaAlgo::fft, EmaAlgo::scan, EmaAlgo::direct})
    if (s == to_string(a)) return a;
  throw ValueError(str_cat("unknown EMA algorithm '", s, "' (expected automatic, fft, scan or direct)"));
}

/// The inverse of to_json: the reference's keys via from_reference_json, then ours.
inline SeqBoatModelConfig seqboat_config_from_json(const nlohmann::json& j) {
  SeqBoatModelConfig c = SeqBoatModelConfig::from_reference_json(j);
  if (j.contains("routing")) c.routing = parse_routing_semantics(j["routing"].get<std::string>());
  if (j.contains("ema_algo")) c.ema_algo = parse_ema_algo(j["ema_algo"].get<std::string>());
  if (j.contains("router_shift")) c.router_shift = j["router_shift"].get<double>();
  return c;
}

}  // namespace sma::train
