// sma/optim/loss.hpp: softmax cross-entropy for classification and next-token prediction.
#pragma once

#include <sma/core/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace sma::optim {

struct LossResult {
  double loss = 0;     ///< mean negative log-likelihood (nats) over counted rows
  Index correct = 0;   ///< rows whose argmax equals the label
  Index counted = 0;   ///< rows with a label other than `ignore`
};

/// logits (N, C), labels (N) in [0, C) or `ignore`. Writes dlogits = d mean_loss / d logits (zero rows for ignored
/// labels) when dlogits is not null. Throws ValueError naming the first out-of-range label.
template <class T>
LossResult cross_entropy(CMatrixMap<T> logits, const std::vector<std::int64_t>& labels, Matrix<T>* dlogits,
                         std::int64_t ignore = -100) {
  const Index N = logits.rows(), C = logits.cols();
  if (static_cast<Index>(labels.size()) != N)
    throw ShapeError(str_cat("cross_entropy: ", labels.size(), " labels for ", N, " rows of logits"));
  LossResult r;
  if (dlogits) dlogits->setZero(N, C);
  for (Index i = 0; i < N; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == ignore) continue;
    if (y < 0 || y >= C) throw ValueError(str_cat("cross_entropy: label ", y, " at row ", i, " is outside [0, ", C, ")"));
    ++r.counted;
  }
  if (r.counted == 0) return r;
  for (Index i = 0; i < N; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == ignore) continue;
    Index arg = 0;
    double mx = double(logits(i, 0));
    for (Index c = 1; c < C; ++c)
      if (double(logits(i, c)) > mx) mx = double(logits(i, c)), arg = c;
    double sum = 0;
    for (Index c = 0; c < C; ++c) sum += std::exp(double(logits(i, c)) - mx);
    const double lse = mx + std::log(sum);
    r.loss += lse - double(logits(i, y));
    r.correct += arg == y ? 1 : 0;
    if (dlogits) {
      for (Index c = 0; c < C; ++c)
        (*dlogits)(i, c) = static_cast<T>((std::exp(double(logits(i, c)) - lse) - (c == y ? 1.0 : 0.0)) / double(r.counted));
    }
  }
  r.loss /= double(r.counted);
  return r;
}

}  // namespace sma::optim
