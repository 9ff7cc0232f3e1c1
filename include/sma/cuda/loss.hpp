// sma/cuda/loss.hpp: softmax cross-entropy on the device (definitions in cuda/model/loss.cu), the loss of
// sma::optim::cross_entropy: mean negative log-likelihood over the rows whose label is not `ignore`, and its
// gradient. No CUDA header is included; tensors are device pointers.
//
// SHAPES   logits (rows, C) fp32, labels (rows) int32 in [0, C) or `ignore`, dlogits (rows, C) or nullptr.
// RESULT   result (5 doubles, device): mean loss, rows whose argmax (first maximum) is the label, counted rows, the
//          first row with a label outside [0, C) (-1 if none) and that label. A bad label cannot throw without a
//          wait for the host, so the loss is then NaN and the host reader (CrossEntropyValue::from) throws.
// MATHS    per row lse - logit[y] with the log-sum-exp in double; dlogits = (softmax - onehot) / counted, 0 on
//          ignored rows (all rows when nothing is counted; the loss is then 0). The rows' losses are summed in a
//          fixed order (deterministic).
#pragma once

#include <sma/core/error.hpp>

#include <cstdint>
#include <vector>

namespace sma::cuda {

void cross_entropy(int rows, int classes, const float* logits, const int* labels, int ignore, float* dlogits,
                   double* result, void* stream = nullptr);

/// The host view of `result` (downloaded by the caller).
struct CrossEntropyValue {
  double loss = 0;
  long long correct = 0, counted = 0;

  /// Throws ValueError naming the first out-of-range label.
  static CrossEntropyValue from(const std::vector<double>& r, int classes) {
    if (r.size() != 5) throw ShapeError(str_cat("CrossEntropyValue: expected 5 values, got ", r.size()));
    if (r[3] >= 0)
      throw ValueError(str_cat("sma::cuda::cross_entropy: label ", static_cast<long long>(r[4]), " at row ",
                               static_cast<long long>(r[3]), " is outside [0, ", classes, ")"));
    return {r[0], static_cast<long long>(r[1]), static_cast<long long>(r[2])};
  }
};

}  // namespace sma::cuda
