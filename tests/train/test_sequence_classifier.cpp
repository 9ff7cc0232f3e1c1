// Images as patch sequences (train/patches.hpp); SequenceClassifier around a composed body (gradient against finite
// differences, padding ignored, it learns); the trainer's time limit.
#include <catch2/catch.hpp>

#include <sma/compose/residual.hpp>
#include <sma/compose/seq.hpp>
#include <sma/layers/ema.hpp>
#include <sma/layers/ffn.hpp>
#include <sma/layers/norm.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/patches.hpp>
#include <sma/train/sequence_classifier.hpp>
#include <sma/train/trainer.hpp>

#include <random>
#include <string>
#include <vector>

using namespace sma;

namespace {

template <class T>
using Ssm = Residual<PreNorm<LayerNorm<T>, MultiHeadEma<T>>>;
template <class T>
using Body = Seq<Ssm<T>, Ffn<T>>;
template <class T>
using Classifier = train::SequenceClassifier<Body<T>>;

template <class T>
Classifier<T> make_classifier(Index vocab, Index dim, Index classes, std::uint64_t seed) {
  typename MultiHeadEma<T>::Config ema{dim, /*ndim=*/2, Direction::bidirectional};
  Body<T> body(Ssm<T>({LayerNorm<T>({dim}), MultiHeadEma<T>(ema, seed)}), Ffn<T>({dim, 2 * dim}, seed + 1));
  return Classifier<T>({vocab, /*padding_idx=*/0, dim, classes}, std::move(body), seed + 2);
}

}  // namespace

TEST_CASE("to_patches / from_patches: p x p patches in raster order, and back", "[train][patches]") {
  data::Dataset d;
  d.feature_dim = 1;
  d.num_classes = 2;
  data::Example e;
  for (int i = 0; i < 784; ++i) e.values.push_back(float(i));
  d.examples.push_back(e);

  const data::Dataset p2 = train::to_patches(d, 2);
  REQUIRE(p2.feature_dim == 4);
  const auto& v = p2.examples[0].values;
  REQUIRE(v.size() == 784);
  CHECK(std::vector<float>(v.begin(), v.begin() + 8) == std::vector<float>{0, 1, 28, 29, 2, 3, 30, 31});
  CHECK(v[14 * 4] == 56.0f);  // token 14 = the first patch of the second patch row: pixel (2, 0)
  CHECK(train::from_patches(v, 2) == e.values);

  const data::Dataset p4 = train::to_patches(d, 4);
  CHECK(p4.feature_dim == 16);
  CHECK(p4.examples[0].values[4] == 28.0f);  // second row of the first patch
  CHECK(train::from_patches(p4.examples[0].values, 4) == e.values);
  CHECK(train::to_patches(d, 1).examples[0].values == e.values);

  CHECK_THROWS_WITH(train::to_patches(d, 3), Catch::Contains("must divide 28"));
  data::Dataset bad = d;
  bad.examples[0].values.pop_back();
  CHECK_THROWS_AS(train::to_patches(bad, 2), ValueError);
}

TEST_CASE("SequenceClassifier: gradients match finite differences, padded positions change nothing",
          "[train][sequence_classifier]") {
  const Index V = 5, D = 4, C = 3, B = 2, L = 5;
  Classifier<double> m = make_classifier<double>(V, D, C, 7);
  Tensor2<std::int32_t> ids(B, L);
  ids.setValues({{1, 2, 3, 4, 2}, {3, 1, 4, 0, 0}});
  Mask pad(B, L);
  pad.setZero();
  pad(1, 3) = pad(1, 4) = 1;
  Tensor2<double> w(B, C);  // loss = sum(w * logits)
  w.setValues({{0.3, -1.1, 0.7}, {0.9, 0.2, -0.5}});

  Context ctx(Mode::train, 1);
  ctx.padding = &pad;
  auto loss = [&]() {
    typename Classifier<double>::Cache c;
    const Tensor2<double> y = m.forward(ctx, ids, c);
    double s = 0;
    for (Index b = 0; b < B; ++b)
      for (Index k = 0; k < C; ++k) s += w(b, k) * y(b, k);
    return s;
  };
  typename Classifier<double>::Cache c;
  const Tensor2<double> logits = m.forward(ctx, ids, c);
  for_each_param(m, [](const std::string&, Param<double>& p) { p.zero_grad(); });
  m.backward(ctx, w, c);

  int checked = 0;
  double worst = 0;
  std::string worst_name;
  for_each_param(m, [&](const std::string& name, Param<double>& p) {
    for (Index i = 0; i < p.size(); ++i) {
      const double keep = p.data()[i], h = 1e-6;
      p.data()[i] = keep + h;
      const double up = loss();
      p.data()[i] = keep - h;
      const double down = loss();
      p.data()[i] = keep;
      const double fd = (up - down) / (2 * h), an = p.grad()[i];
      const double err = std::abs(fd - an) / std::max(1.0, std::abs(fd));
      if (err > worst) worst = err, worst_name = name + "[" + std::to_string(i) + "]";
      ++checked;
    }
  });
  INFO("worst relative error " << worst << " at " << worst_name);
  CHECK(checked > 100);
  CHECK(worst < 1e-6);

  // A different token under the padding mask changes no logit.
  ids(1, 3) = 2;
  ids(1, 4) = 4;
  typename Classifier<double>::Cache c2;
  const Tensor2<double> again = m.forward(ctx, ids, c2);
  for (Index b = 0; b < B; ++b)
    for (Index k = 0; k < C; ++k) CHECK(again(b, k) == Approx(logits(b, k)).margin(1e-14));

  // A row that is all padding has no mean.
  pad(0, 0) = pad(0, 1) = pad(0, 2) = pad(0, 3) = pad(0, 4) = 1;
  CHECK_THROWS_WITH(m.forward(ctx, ids, c2), Catch::Contains("all padding"));
}

TEST_CASE("SequenceClassifier trains on token data; the trainer stops at its time limit", "[train][sequence_classifier]") {
  // Label 1 when token 4 occurs; variable lengths, padded batches.
  data::Dataset ds;
  ds.vocab_size = 5;
  ds.pad_token = 0;
  ds.num_classes = 2;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 192; ++i) {
    data::Example e;
    const int len = 6 + static_cast<int>(rng() % 10);
    for (int t = 0; t < len; ++t) e.tokens.push_back(1 + static_cast<std::int32_t>(rng() % 3));
    e.label = i % 2;
    if (e.label) e.tokens[rng() % static_cast<std::size_t>(len)] = 4;
    ds.examples.push_back(std::move(e));
  }
  Classifier<float> m = make_classifier<float>(5, 8, 2, 3);
  train::TrainConfig tc;
  tc.steps = 120;
  tc.lr = 1e-2;
  tc.warmup = 5;
  tc.threads = 2;
  tc.seed = 2;
  train::EpochBatches<float> batches(ds, 16, tc.seed, 16, data::PadTo::longest);
  {
    train::Trainer<train::ClassificationTask<Classifier<float>>> tr(m, tc);
    train::FitOptions<data::Batch<float>> fit;
    fit.batch = [&](Index s) { return batches(s); };
    fit.progress = false;
    fit.time_limit = 1e-9;  // already over before the first step
    tr.fit(fit);
    CHECK(tr.step() == 0);
  }
  train::Trainer<train::ClassificationTask<Classifier<float>>> tr(m, tc);
  train::FitOptions<data::Batch<float>> fit;
  fit.batch = [&](Index s) { return batches(s); };
  fit.progress = false;
  fit.time_limit = 600;
  tr.fit(fit);
  CHECK(tr.step() == 120);
  train::SequentialBatches<float> eb(ds, 64, 16, data::PadTo::longest);
  const train::ShardResult r = tr.evaluate(eb);
  CHECK(r.loss() < 0.3);  // chance: ln 2 = 0.69
  CHECK(r.accuracy() > 0.9);
}
