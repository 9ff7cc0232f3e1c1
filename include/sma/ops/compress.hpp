// sma/ops/compress.hpp: compress (gather the activated tokens of each batch row into a short packed sequence) and
// extract (put the results back at their original positions, scaled by the router's gate).
//
// The compressed batch is RAGGED and PACKED: row b occupies slots [offsets[b], offsets[b+1]) of an (S, D) matrix,
// with no padding between rows. Each slot remembers its token (b*L + t) and original position t. This gives the
// same numbers as the reference, which pads every row to the densest one and masks the filler keys, without
// computing the filler.
//
// Two semantics (RoutingSemantics):
//  - reference (default): exactly the official code. If some row has ALL of its L positions activated, the whole
//    batch runs uncompressed: every position is a slot, non-activated tokens are masked keys (key_valid = 0) and
//    their query rows are discarded; the attention window is then counted in original positions for every row.
//    Otherwise each row holds its activated tokens only, and the window is counted in compressed slots.
//  - per_row (the paper's plain semantics): every row is compressed on its own, always. It differs from
//    `reference` only for batches where one row is fully activated and another is not: there the other rows'
//    windows are counted in compressed slots rather than original positions.
// With no activated token at all, S = 0 and the sub-module is skipped (the reference runs it on one dummy zero
// position and multiplies the result by 0).
#pragma once

#include <sma/core/tensor.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace sma {

enum class RoutingSemantics : std::uint8_t { reference, per_row };

/// Where each compressed slot comes from. Built once per forward by `plan_compression` and kept in the Cache.
struct Compression {
  Index batch = 0, length = 0;
  bool compressed = true;               ///< false: the reference's uncompressed fallback (every position is a slot)
  std::vector<Index> offsets;           ///< B+1: row b owns slots [offsets[b], offsets[b+1])
  std::vector<Index> token;             ///< S: flat token index b*L + t of each slot
  std::vector<std::int64_t> positions;  ///< S: original position t of each slot
  std::vector<std::uint8_t> key_valid;  ///< S: 1 when the slot's token is activated (all 1 when compressed)
  std::vector<Index> num_active;        ///< B: activated tokens per row

  Index slots() const { return offsets.empty() ? 0 : offsets.back(); }
  Index max_active() const {
    Index m = 0;
    for (Index n : num_active) m = n > m ? n : m;
    return m;
  }
  bool empty() const { return slots() == 0 || max_active() == 0; }
};

/// Plans the compression of a (B, L) activation mask (1 = routed to the sub-module; padding must already be 0)
/// into `c`, reusing its vectors' storage (no allocation when a previous plan was at least as large).
inline void plan_compression_into(const Tensor2<std::uint8_t>& active, RoutingSemantics semantics, Compression& c) {
  c.batch = active.dimension(0);
  c.length = active.dimension(1);
  c.num_active.assign(static_cast<std::size_t>(c.batch), 0);
  for (Index b = 0; b < c.batch; ++b) {
    Index n = 0;
    for (Index t = 0; t < c.length; ++t) n += active(b, t) ? 1 : 0;
    c.num_active[static_cast<std::size_t>(b)] = n;
  }
  c.compressed = semantics == RoutingSemantics::per_row || c.max_active() < c.length;
  c.offsets.assign(1, 0);
  c.token.clear();
  c.positions.clear();
  c.key_valid.clear();
  if (c.max_active() == 0) {
    c.offsets.assign(static_cast<std::size_t>(c.batch) + 1, 0);
    return;
  }
  std::size_t total = 0;
  for (Index b = 0; b < c.batch; ++b) total += static_cast<std::size_t>(c.compressed ? c.num_active[b] : c.length);
  c.token.reserve(total);
  c.positions.reserve(total);
  c.key_valid.reserve(total);
  for (Index b = 0; b < c.batch; ++b) {
    for (Index t = 0; t < c.length; ++t) {
      const bool on = active(b, t) != 0;
      if (c.compressed && !on) continue;
      c.token.push_back(b * c.length + t);
      c.positions.push_back(t);
      c.key_valid.push_back(on ? 1 : 0);
    }
    c.offsets.push_back(static_cast<Index>(c.token.size()));
  }
}

/// Plans the compression of a (B, L) activation mask (1 = routed to the sub-module; padding must already be 0).
inline Compression plan_compression(const Tensor2<std::uint8_t>& active, RoutingSemantics semantics) {
  Compression c;
  plan_compression_into(active, semantics, c);
  return c;
}

/// (B*L, D) -> (S, D): row s of the result is row token[s] of x.
template <class T>
Matrix<T> compress(CMatrixMap<T> x, const Compression& c) {
  if (x.rows() != c.batch * c.length)
    throw ShapeError(str_cat("compress: x has ", x.rows(), " rows, expected B*L = ", c.batch * c.length));
  Matrix<T> xc(c.slots(), x.cols());
  for (Index s = 0; s < c.slots(); ++s) xc.row(s) = x.row(c.token[static_cast<std::size_t>(s)]);
  return xc;
}

/// Backward of compress: dx[token[s]] += dxc[s]. dx is (B*L, D).
template <class T>
void compress_backward(CMatrixMap<T> dxc, const Compression& c, MatrixMap<T> dx) {
  for (Index s = 0; s < c.slots(); ++s) dx.row(c.token[static_cast<std::size_t>(s)]) += dxc.row(s);
}

/// out[token[s]] += gate[token[s]] * hc[s] for every slot whose token is activated. out is (B*L, D), gate (B*L).
template <class T>
void extract_add(CMatrixMap<T> hc, const Compression& c, const T* gate, MatrixMap<T> out) {
  for (Index s = 0; s < c.slots(); ++s) {
    if (!c.key_valid[static_cast<std::size_t>(s)]) continue;
    const Index tok = c.token[static_cast<std::size_t>(s)];
    out.row(tok) += gate[tok] * hc.row(s);
  }
}

/// Backward of extract_add given dout (B*L, D): dhc[s] = gate * dout[token] (0 for discarded slots), and
/// dgate[token] = <dout[token], hc[s]> (assigned for activated tokens; other entries untouched).
template <class T>
void extract_backward(CMatrixMap<T> hc, const Compression& c, const T* gate, CMatrixMap<T> dout, Matrix<T>& dhc,
                      T* dgate) {
  dhc.setZero(c.slots(), hc.cols());
  for (Index s = 0; s < c.slots(); ++s) {
    if (!c.key_valid[static_cast<std::size_t>(s)]) continue;
    const Index tok = c.token[static_cast<std::size_t>(s)];
    dhc.row(s) = gate[tok] * dout.row(tok);
    dgate[tok] = dout.row(tok).dot(hc.row(s));
  }
}

inline RoutingSemantics parse_routing_semantics(const std::string& s) {
  if (s == "reference") return RoutingSemantics::reference;
  if (s == "per_row") return RoutingSemantics::per_row;
  throw ValueError(str_cat("unknown routing semantics '", s, "' (expected 'reference' or 'per_row')"));
}

}  // namespace sma
