// sma/train/token_classifier.hpp: TokenClassifier<T>, the reference's SeqBoatModel classifier behind a token
// embedding, for token data (ListOps, bytes of e-mails). SeqBoatModel itself is unchanged (its golden behaviour
// stays exactly the reference's); this wrapper only adds the lookup in front of it.
#pragma once

#include <sma/layers/embedding.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/model_config.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>

namespace sma::train {

struct TokenClassifierConfig {
  Index vocab_size = 0;             ///< token ids are in [0, vocab_size)
  std::int64_t padding_idx = -1;    ///< the pad id (its embedding row stays 0), or -1
  SeqBoatModelConfig model;         ///< model.d_input is the embedding width

  nlohmann::json to_json() const {
    nlohmann::json j = train::to_json(model);
    j["vocab_size"] = vocab_size;
    j["padding_idx"] = padding_idx;
    return j;
  }
  static TokenClassifierConfig from_json(const nlohmann::json& j) {
    TokenClassifierConfig c;
    c.vocab_size = j.at("vocab_size").get<Index>();
    c.padding_idx = j.value("padding_idx", std::int64_t(-1));
    c.model = seqboat_config_from_json(j);
    return c;
  }
};

/// TokenClassifier<T>: logits = SeqBoatModel(Embedding(ids)).
///
/// SHAPES    ids (B, L) int32 -> logits (B, d_output). ctx.padding (B, L) marks the padded positions, as for
///           SeqBoatModel (the mean pooling then runs over real tokens only).
/// PARAMS    embedding.weight (vocab_size, d_input), then SeqBoatModel's own names, unprefixed (encoder.*,
///           seq_layers.<i>.*, final_norm.* with pre-norm, decoder.*): a PyTorch module holding an nn.Embedding
///           called `embedding` next to the reference model's modules has the same state_dict keys.
/// GRADIENTS backward takes dlogits (B, d_output) and adds to every parameter's gradient; ids have none.
template <class T>
class TokenClassifier {
 public:
  using Scalar = T;
  using Config = TokenClassifierConfig;
  struct Cache {
    typename Embedding<T>::Cache embedding;
    typename SeqBoatModel<T>::Cache model;
  };

  TokenClassifier() = default;
  explicit TokenClassifier(const Config& cfg, std::uint64_t seed = 0)
      : cfg_(cfg),
        embedding_(typename Embedding<T>::Config{cfg.vocab_size, cfg.model.d_input, cfg.padding_idx}, seed ^ 0x5eedULL),
        model_(cfg.model, seed) {}

  const Config& config() const { return cfg_; }
  Embedding<T>& embedding() { return embedding_; }
  SeqBoatModel<T>& model() { return model_; }
  const SeqBoatModel<T>& model() const { return model_; }

  template <class V>
  void visit_params(V&& v) {
    visit_child(v, "embedding.", embedding_);
    model_.visit_params(v);
  }

  Tensor2<T> forward(Context& ctx, const Tensor2<std::int32_t>& ids, Cache& c) const {
    const Tensor3<T> x = embedding_.forward(ctx, ids, c.embedding);
    return model_.forward(ctx, x, c.model);
  }

  void backward(Context& ctx, const Tensor2<T>& dlogits, const Cache& c) {
    const Tensor3<T> dx = model_.backward(ctx, dlogits, c.model);
    embedding_.backward(ctx, dx, c.embedding);
  }

 private:
  Config cfg_;
  Embedding<T> embedding_;
  SeqBoatModel<T> model_;
};

}  // namespace sma::train
