// custom_hybrid: a tutorial. Build a hybrid sequence model of your own from sma's layer templates, train it on
// ListOps, and watch how much of the sequence its router sends to attention.
//
//   custom_hybrid [steps=1500] [threads=2] [lra]
//
// By default the expressions are short (10 to 100 tokens), so that the model visibly learns within a minute on two
// cores (46.6% test accuracy, majority class 13.4%, in 57 s on the 2-core development machine); with "lra" they
// have LRA's lengths (500 to 2000 tokens), which need far longer runs (docs/results.md).
//
// SeqBoatModel (sma/models/seqboat.hpp) is the paper's model with the reference's exact dataflow. Here we build a
// different model from the same parts instead, the way you would try an idea of your own:
//
//   tokens -> Embedding -> [ Block ] x 2 -> LayerNorm -> mean over real tokens -> Linear -> 10 classes
//
//   Block = x + EMA(LayerNorm(x))                       an SSM mixer that sees EVERY token
//         -> x + Sma<Router, Gau>(LayerNorm(x))         attention only over the tokens a learned router picks
//         -> Ffn(x)                                     a feed-forward block (its own pre-norm and residual)
//
// Every piece is a class template with the same contract (docs/layer_contract.md): forward is const and fills a
// Cache, backward returns dx and adds the parameter gradients, visit_params names the parameters. Composition
// templates (Seq, Residual, PreNorm, Repeat, Sma) are layers themselves, so the whole model is one type and its
// gradient is exact by construction (each part is checked against finite differences in the tests).
#include <sma/compose/repeat.hpp>
#include <sma/compose/residual.hpp>
#include <sma/compose/seq.hpp>
#include <sma/compose/sparse.hpp>
#include <sma/data/listops.hpp>
#include <sma/layers/ema.hpp>
#include <sma/layers/ffn.hpp>
#include <sma/layers/gau.hpp>
#include <sma/layers/norm.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/sequence_classifier.hpp>
#include <sma/train/trainer.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>

using namespace sma;
using T = float;  // every layer is a template over the scalar type; double works too (gradient checks use it)

// ---- 1. The types. ------------------------------------------------------------------------------------------------
// Residual<L>: y = x + L(x).  PreNorm<Norm, L>: y = L(Norm(x)).  Seq<A, B, C>: y = C(B(A(x))).
// Sma<Router, Module>: the router decides per token whether Module runs on it; the chosen tokens of each row are
// compressed into a short packed sequence, Module (here the gated attention unit) runs on that, and its output is
// scattered back to the chosen positions, scaled by the router's gate (so the routing decision gets a gradient).
// Tokens the router skips get 0 from Sma, so with the Residual around it they pass through unchanged.
using Ssm = Residual<PreNorm<LayerNorm<T>, MultiHeadEma<T>>>;
using Attn = Residual<PreNorm<LayerNorm<T>, Sma<LinearRouter<T>, Gau<T>>>>;
struct Block : Seq<Ssm, Attn, Ffn<T>> {  // a named struct keeps compiler messages and symbol names short
  using Seq::Seq;
};
using Body = Repeat<2, Block>;                    // two blocks, each with its own parameters
using Model = train::SequenceClassifier<Body>;    // embedding in front, norm + mean pooling + decoder behind

// ---- 2. The values: widths and seeds are run-time configuration. ---------------------------------------------
Body make_body(Index D, Index window, Index max_len) {
  typename Gau<T>::Config gau{D, /*zdim=*/D / 2, /*hdim=*/2 * D};
  gau.attention.window = window;  // working memory W: each routed token attends to the W routed tokens around it
  gau.attention.direction = Direction::bidirectional;  // classification: no causal mask
  gau.attention.max_positions = max_len;              // relative-position bias table size
  typename MultiHeadEma<T>::Config ema{D, /*ndim=*/8, Direction::bidirectional};
  return Body([&](std::size_t i) {  // Repeat calls this once per block: block i gets its own seeds
    Gau<T> g(gau);
    g.reset_parameters(100 + i);
    return Block(Ssm({LayerNorm<T>({D}), MultiHeadEma<T>(ema, i)}),
                 Attn({LayerNorm<T>({D}), {LinearRouter<T>({D}, 200 + i), std::move(g)}}),
                 Ffn<T>({D, /*hidden=*/2 * D}, 300 + i));
  });
}

// ---- 3. Let the trainer report the activation density of each block. ----------------------------------------
// The trainer asks for count_activations(model, cache, padding, counts) (sma/train/activity.hpp) and finds this
// overload by argument-dependent lookup. The caches mirror the types: Repeat -> children[i], Seq -> the tuple
// `children`, Residual -> inner, PreNorm (a Seq of the norm and the layer) -> get<1>, Sma -> router.
void count_activations(const Model&, const Model::Cache& c, const Mask* padding, train::ActivityCounts& out) {
  out.active.assign(c.body.children.size(), 0);
  out.real.assign(c.body.children.size(), 0);
  for (std::size_t i = 0; i < c.body.children.size(); ++i) {
    const auto& attn = std::get<1>(c.body.children[i].children);  // the Attn part of block i
    const auto& sma = std::get<1>(attn.inner.children);           // inside its PreNorm
    const Tensor2<std::uint8_t>& on = LinearRouter<T>::active(sma.router);  // (B, L): 1 = sent to attention
    for (Index b = 0; b < on.dimension(0); ++b)
      for (Index t = 0; t < on.dimension(1); ++t)
        if (!is_padding(padding, b, t)) ++out.real[i], out.active[i] += on(b, t) ? 1 : 0;
  }
}

int main(int argc, char** argv) {
  const Index steps = argc > 1 ? std::atol(argv[1]) : 1500;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const bool lra = argc > 3 && std::string(argv[3]) == "lra";

  // ---- 4. Data: ListOps expressions such as "[MAX 4 3 [MIN 2 3 ] 1 0 ]" -> 4 (10 classes). -------------------
  // Generated with LRA's procedure from a seed (sma/data/listops.hpp), so there is nothing to download.
  data::ListOpsConfig lc;  // LRA's settings: depth 10, up to 10 arguments, 500 < length < 2000
  if (!lra) lc.max_depth = 4, lc.max_args = 5, lc.min_length = 10, lc.max_length = 100;
  const Index D = 64, max_len = lc.max_length;
  const data::Splits lo = data::generate_listops_splits(10000, 0, 500, lc, /*seed=*/0);

  Model model({data::listops::vocab_size, data::listops::pad, D, data::listops::num_classes},
              make_body(D, /*window=*/64, max_len), /*seed=*/1);
  std::printf("custom hybrid: %lld parameters, for example:\n", static_cast<long long>(count_params(model)));
  int shown = 0;  // the names are those a PyTorch module built the same way would have in its state_dict
  for_each_param(model, [&](const std::string& name, Param<T>& p) {
    if (name.find("body.0.") == 0 && shown++ < 6) std::printf("  %-45s %s\n", name.c_str(), shape_string(p.shape()).c_str());
  });
  std::fflush(stdout);  // before the progress bar, which goes to stderr

  // ---- 5. Train: AdamW, warm-up then cosine decay, clipping; batches split across the threads. -------------
  train::TrainConfig tc;
  tc.steps = steps;
  tc.lr = 2e-3;
  tc.warmup = steps / 20;
  tc.threads = threads;
  tc.seed = 1;
  train::Trainer<train::ClassificationTask<Model>> trainer(model, tc);

  // Each batch is padded to its longest expression; the padding mask (Context::padding) keeps pads out of the
  // EMA, the router (never activates them) and the mean.
  train::EpochBatches<T> batches(lo.train, /*batch=*/lra ? 16 : 32, tc.seed, max_len, data::PadTo::longest);
  train::FitOptions<data::Batch<T>> fit;
  fit.batch = [&](Index step) { return batches(step); };
  fit.checkpoint_path = "custom_hybrid.safetensors";  // the parameters under the names above, plus optimiser state
  trainer.fit(fit);                                   // progress: loss, accuracy, tokens/s, density per block

  // ---- 6. Evaluate on held-out expressions. -------------------------------------------------------------------
  train::SequentialBatches<T> test_batches(lo.test, 16, max_len, data::PadTo::longest);
  const train::ShardResult r = trainer.evaluate(test_batches);
  const auto counts = data::class_counts(lo.test);
  std::printf("test accuracy %.2f%% on %lld expressions (majority class %.1f%%)\n", 100 * r.accuracy(),
              static_cast<long long>(r.counted),
              100.0 * double(*std::max_element(counts.begin(), counts.end())) / double(lo.test.size()));
  std::printf("share of tokens each block sent to attention: %s\n",
              train::format_density(r.activity.densities()).c_str());
}
