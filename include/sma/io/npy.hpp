// sma/io/npy.hpp: NumPy .npy files for sma tensors (reading format versions 1.0, 2.0 and 3.0, writing 1.0).
//
// FORMAT: the magic "\x93NUMPY", a major and a minor version byte, the header length (u16 little-endian in 1.0,
// u32 in 2.0/3.0), then the header: a Python dict literal {'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces and ended by '\n' (ASCII; UTF-8 in 3.0); then the array's bytes. See docs/io.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/tensor.hpp>
#include <sma/io/atomic_file.hpp>
#include <sma/io/dtype.hpp>

#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sma {
namespace io {

/// The .npy `descr` of a dtype: F64 "<f8", F32 "<f4", F16 "<f2", I64 "<i8", I32 "<i4", U8 "|u1", BOOL "|b1".
/// BF16 has none (NumPy has no bfloat16) and throws ValueError.
inline std::string npy_descr(DType t);
/// The dtype of a .npy `descr` among those above, or nothing.
inline std::optional<DType> dtype_from_npy_descr(const std::string& descr);

/// An array read from a .npy file, always in C order (a Fortran-order file is reordered on reading).
struct NpyArray {
  DType dtype = DType::F64;
  std::vector<Index> shape;         // () is a scalar (one element)
  std::vector<std::uint8_t> bytes;  // row-major, little-endian
  std::string origin;               // the file, for messages

  Index numel() const {
    Index n = 1;
    for (Index d : shape) n *= d;  // validated on reading
    return n;
  }
  /// The array as a rank-R tensor of T (conversions as in dtype.hpp: floating dtypes into float/double, integer
  /// dtypes into integer or floating types). ShapeError when the rank differs, KeyError for a float into an integer.
  template <class T, int R>
  Tensor<T, R> tensor() const;
  /// All elements, row-major, converted to T.
  template <class T>
  std::vector<T> values() const;
};

/// Reads and validates a .npy file. Every violation is an IoError naming the file, the byte offset and the rule:
///   shorter than the 10-byte preamble; wrong magic; a version other than 1.0/2.0/3.0; header length past the end of
///   the file; header not ending in '\n' or (1.0/2.0) not ASCII; header not a dict literal of exactly the keys
///   'descr', 'fortran_order', 'shape' (each once); descr not one of npy_descr's (big-endian and structured dtypes
///   are rejected by name); fortran_order not True/False; shape not a tuple of non-negative integers or with an
///   element count that overflows; data shorter than the shape needs; trailing bytes after the data.
inline NpyArray read_npy(const std::string& path);
/// The same checks on bytes in memory; `origin` names them in messages.
inline NpyArray parse_npy(const std::vector<std::uint8_t>& file, const std::string& origin);

/// Loads a .npy file as a rank-R tensor of T.
template <class T, int R>
Tensor<T, R> load_npy(const std::string& path) {
  return read_npy(path).tensor<T, R>();
}

/// The bytes of a .npy 1.0 file (2.0 if the header would exceed 65535 bytes) holding `bytes`, which are product(shape)
/// little-endian elements of `dtype` in C order. The header is padded so that the data start at a multiple of 64.
inline std::vector<std::uint8_t> npy_file_bytes(DType dtype, const std::vector<Index>& shape, const void* bytes,
                                                std::size_t nbytes);

/// Saves product(shape) row-major elements from `data` as dtype `as`, atomically (see write_file_atomic).
template <class T>
void save_npy(const std::string& path, const T* data, const std::vector<Index>& shape, DType as,
              const AtomicWriteOptions& options = {});
/// Saves `t` in its own dtype (double "<f8", float "<f4", int64 "<i8", int32 "<i4", uint8 "|u1", bool "|b1").
template <class T, int R>
void save_npy(const std::string& path, const Tensor<T, R>& t, const AtomicWriteOptions& options = {}) {
  const auto d = dims_of(t);
  save_npy(path, t.data(), std::vector<Index>(d.begin(), d.end()), dtype_of<T>, options);
}
/// Saves `t` converted to dtype `as` (e.g. double as "<f4").
template <class T, int R>
void save_npy(const std::string& path, const Tensor<T, R>& t, DType as, const AtomicWriteOptions& options = {}) {
  const auto d = dims_of(t);
  save_npy(path, t.data(), std::vector<Index>(d.begin(), d.end()), as, options);
}

// ---- implementation ----

inline std::string npy_descr(DType t) {
  switch (t) {
    case DType::F64: return "<f8";
    case DType::F32: return "<f4";
    case DType::F16: return "<f2";
    case DType::I64: return "<i8";
    case DType::I32: return "<i4";
    case DType::U8: return "|u1";
    case DType::BOOL: return "|b1";
    case DType::BF16: break;
  }
  throw ValueError(str_cat("dtype ", to_string(t), " has no .npy descr (NumPy has no bfloat16; store it as F32)"));
}

inline std::optional<DType> dtype_from_npy_descr(const std::string& descr) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::I64, DType::I32, DType::U8, DType::BOOL}) {
    if (descr == npy_descr(t)) return t;
  }
  return std::nullopt;
}

namespace detail {

// A parser for the one Python literal a .npy header holds: a dict of string keys whose values are strings,
// True/False, or tuples of integers. Anything else is an error at a byte offset.
class NpyHeaderParser {
 public:
  struct Value {
    enum Kind { string, boolean, tuple } kind = string;
    std::string text;
    bool flag = false;
    std::vector<std::uint64_t> ints;
    bool tuple_has_comma = false;
  };

  NpyHeaderParser(const std::string& s, std::size_t file_offset, const std::string& origin)
      : s_(s), base_(file_offset), origin_(origin) {}

  std::vector<std::pair<std::string, Value>> parse_dict() {
    std::vector<std::pair<std::string, Value>> out;
    skip_space();
    expect('{');
    skip_space();
    while (peek() != '}') {
      const std::size_t key_at = pos_;
      if (peek() != '\'' && peek() != '"') fail("expected a quoted key or '}'");
      std::string key = parse_string();
      for (const auto& kv : out) {
        if (kv.first == key) fail_at(key_at, str_cat("key '", key, "' appears twice"));
      }
      skip_space();
      expect(':');
      skip_space();
      out.emplace_back(std::move(key), parse_value());
      skip_space();
      if (peek() == ',') {
        ++pos_;
        skip_space();
      } else if (peek() != '}') {
        fail("expected ',' or '}' after a value");
      }
    }
    ++pos_;
    skip_space();
    if (pos_ != s_.size()) fail("unexpected text after the closing '}'");
    return out;
  }

  [[noreturn]] void fail_at(std::size_t at, const std::string& what) const {
    throw IoError(str_cat(origin_, ": .npy header, file byte ", base_ + at, ": ", what, " (header: ",
                          trimmed(), ")"));
  }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  [[noreturn]] void fail(const std::string& what) const { fail_at(pos_, what); }
  std::string trimmed() const {
    std::string t = s_.substr(0, 120);
    while (!t.empty() && (t.back() == ' ' || t.back() == '\n')) t.pop_back();
    return t;
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t')) ++pos_;
  }
  void expect(char c) {
    if (peek() != c) fail(str_cat("expected '", c, "'"));
    ++pos_;
  }
  std::string parse_string() {
    const char quote = s_[pos_++];
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != quote) {
      if (s_[pos_] == '\\') fail("escape sequences are not supported in header strings");
      out += s_[pos_++];
    }
    if (pos_ >= s_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }
  std::uint64_t parse_uint() {
    const std::size_t start = pos_;
    if (peek() == '-') fail("a shape extent is negative");
    std::uint64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      const auto digit = static_cast<std::uint64_t>(peek() - '0');
      if (v > (static_cast<std::uint64_t>(PTRDIFF_MAX) - digit) / 10) fail_at(start, "a shape extent is too large");
      v = v * 10 + digit;
      ++pos_;
    }
    if (pos_ == start) fail("expected a non-negative integer");
    return v;
  }
  Value parse_value() {
    Value v;
    if (peek() == '\'' || peek() == '"') {
      v.kind = Value::string;
      v.text = parse_string();
    } else if (s_.compare(pos_, 4, "True") == 0) {
      v.kind = Value::boolean;
      v.flag = true;
      pos_ += 4;
    } else if (s_.compare(pos_, 5, "False") == 0) {
      v.kind = Value::boolean;
      pos_ += 5;
    } else if (peek() == '(') {
      v.kind = Value::tuple;
      ++pos_;
      skip_space();
      while (peek() != ')') {
        v.ints.push_back(parse_uint());
        skip_space();
        if (peek() == ',') {
          v.tuple_has_comma = true;
          ++pos_;
          skip_space();
        } else if (peek() != ')') {
          fail("expected ',' or ')' in a tuple");
        }
      }
      ++pos_;
    } else {
      fail("expected a string, True, False or a tuple of integers");
    }
    return v;
  }

  const std::string& s_;
  std::size_t base_;
  const std::string& origin_;
  std::size_t pos_ = 0;
};

}  // namespace detail

inline NpyArray parse_npy(const std::vector<std::uint8_t>& file, const std::string& origin) {
  auto error = [&](const std::string& what) { return IoError(str_cat(origin, ": ", what)); };
  const std::size_t size = file.size();
  if (size < 10) throw error(str_cat("file is ", size, " bytes, shorter than the 10-byte .npy preamble"));
  static const char kMagic[] = "\x93NUMPY";
  if (std::memcmp(file.data(), kMagic, 6) != 0) {
    throw error("file bytes [0, 6) are not the .npy magic \"\\x93NUMPY\" (not a .npy file)");
  }
  const int major = file[6], minor = file[7];
  std::size_t header_start;
  std::uint64_t header_len;
  if (major == 1 && minor == 0) {
    header_len = detail::load_le<std::uint16_t>(file.data() + 8);
    header_start = 10;
  } else if ((major == 2 || major == 3) && minor == 0) {
    if (size < 12) throw error(str_cat("file is ", size, " bytes, shorter than the 12-byte .npy ", major, ".0 preamble"));
    header_len = detail::load_le<std::uint32_t>(file.data() + 8);
    header_start = 12;
  } else {
    throw error(str_cat("unsupported .npy format version ", major, ".", minor, " (file bytes [6, 8); supported: 1.0, 2.0, 3.0)"));
  }
  if (header_len > size - header_start) {
    throw error(str_cat("header length ", header_len, " (file bytes [8, ", header_start, ")) exceeds the ",
                        size - header_start, " bytes that follow it: the file is truncated"));
  }
  const std::size_t data_start = header_start + static_cast<std::size_t>(header_len);
  const std::string header(reinterpret_cast<const char*>(file.data() + header_start), header_len);
  if (header.empty() || header.back() != '\n') {
    throw error(str_cat(".npy header (file bytes [", header_start, ", ", data_start, ")) must end with a newline"));
  }
  if (major < 3) {
    for (std::size_t i = 0; i < header.size(); ++i) {
      if (static_cast<unsigned char>(header[i]) > 127) {
        throw error(str_cat(".npy header byte ", header_start + i, " is not ASCII (only format 3.0 allows UTF-8)"));
      }
    }
  }
  detail::NpyHeaderParser parser(header, header_start, origin);
  const auto dict = parser.parse_dict();
  const detail::NpyHeaderParser::Value* descr = nullptr;
  const detail::NpyHeaderParser::Value* fortran = nullptr;
  const detail::NpyHeaderParser::Value* shape = nullptr;
  for (const auto& kv : dict) {
    if (kv.first == "descr") descr = &kv.second;
    else if (kv.first == "fortran_order") fortran = &kv.second;
    else if (kv.first == "shape") shape = &kv.second;
    else throw error(str_cat(".npy header has the unexpected key '", kv.first, "' (allowed: descr, fortran_order, shape)"));
  }
  for (auto kv : {std::make_pair("descr", descr), std::make_pair("fortran_order", fortran),
                  std::make_pair("shape", shape)}) {
    if (!kv.second) throw error(str_cat(".npy header lacks the key '", kv.first, "'"));
  }
  using Kind = detail::NpyHeaderParser::Value;
  if (descr->kind != Kind::string) {
    throw error(".npy header: 'descr' must be a string such as '<f8' (structured dtypes are not supported)");
  }
  NpyArray a;
  a.origin = origin;
  if (auto dt = dtype_from_npy_descr(descr->text)) {
    a.dtype = *dt;
  } else if (!descr->text.empty() && descr->text[0] == '>') {
    throw error(str_cat(".npy header: big-endian descr '", descr->text, "' is not supported (save little-endian '<",
                        descr->text.substr(1), "')"));
  } else {
    throw error(str_cat(".npy header: unsupported descr '", descr->text,
                        "' (supported: <f8 <f4 <f2 <i8 <i4 |u1 |b1)"));
  }
  if (fortran->kind != Kind::boolean) throw error(".npy header: 'fortran_order' must be True or False");
  if (shape->kind != Kind::tuple) throw error(".npy header: 'shape' must be a tuple of integers, such as (2, 3)");
  if (shape->ints.size() == 1 && !shape->tuple_has_comma) {
    throw error(str_cat(".npy header: 'shape' (", shape->ints[0], ") is not a tuple; a 1-element tuple is written (",
                        shape->ints[0], ",)"));
  }
  std::uint64_t count = 1;
  for (std::uint64_t d : shape->ints) {
    if (!io::detail::checked_mul_u64(count, d, static_cast<std::uint64_t>(PTRDIFF_MAX), count)) {
      throw error(".npy header: the shape has more elements than a 64-bit index can count");
    }
    a.shape.push_back(static_cast<Index>(d));
  }
  std::uint64_t need = 0;
  if (!io::detail::checked_mul_u64(count, dtype_size(a.dtype), static_cast<std::uint64_t>(PTRDIFF_MAX), need)) {
    throw error(".npy header: the shape needs more bytes than a 64-bit offset can address");
  }
  const std::uint64_t have = size - data_start;
  if (have < need) {
    throw error(str_cat("data (file bytes [", data_start, ", ", size, ")) has ", have, " bytes, but shape ",
                        shape_string(a.shape), " of ", descr->text, " needs ", need, ": the file is truncated"));
  }
  if (have > need) {
    throw error(str_cat(have - need, " trailing bytes after the data (file bytes [", data_start + need, ", ", size, "))"));
  }
  const auto* src = file.data() + data_start;
  if (!fortran->flag || a.shape.size() < 2) {
    a.bytes.assign(src, src + need);
    return a;
  }
  // Fortran order: the first index is fastest. Walk the C-order output with an odometer and gather.
  const std::size_t w = dtype_size(a.dtype), rank = a.shape.size();
  std::vector<std::uint64_t> fstride(rank, 1);
  for (std::size_t k = 1; k < rank; ++k) fstride[k] = fstride[k - 1] * static_cast<std::uint64_t>(a.shape[k - 1]);
  a.bytes.resize(need);
  std::vector<Index> idx(rank, 0);
  std::uint64_t from = 0;
  for (std::uint64_t i = 0; i < count; ++i) {
    std::memcpy(a.bytes.data() + i * w, src + from * w, w);
    for (std::size_t k = rank; k-- > 0;) {
      if (++idx[k] < a.shape[k]) {
        from += fstride[k];
        break;
      }
      from -= fstride[k] * static_cast<std::uint64_t>(a.shape[k] - 1);
      idx[k] = 0;
    }
  }
  return a;
}

inline NpyArray read_npy(const std::string& path) { return parse_npy(read_file_bytes(path), path); }

template <class T, int R>
Tensor<T, R> NpyArray::tensor() const {
  if (static_cast<int>(shape.size()) != R) {
    std::string want = "(";
    for (int i = 0; i < R; ++i) want += i ? ", *" : "*";
    throw ShapeError(str_cat(origin, ": stored shape ", shape_string(shape), " has rank ", shape.size(),
                             ", requested rank ", R, " ", want, ")"));
  }
  std::array<Index, R> d{};
  for (int i = 0; i < R; ++i) d[static_cast<std::size_t>(i)] = shape[static_cast<std::size_t>(i)];
  Tensor<T, R> t = uninitialized<T, R>(d);
  decode_elements(dtype, bytes.data(), static_cast<std::size_t>(numel()), t.data(), origin);
  return t;
}

template <class T>
std::vector<T> NpyArray::values() const {
  return decode_vector<T>(dtype, bytes.data(), static_cast<std::size_t>(numel()), origin);
}

inline std::vector<std::uint8_t> npy_file_bytes(DType dtype, const std::vector<Index>& shape, const void* bytes,
                                                std::size_t nbytes) {
  const std::string descr = npy_descr(dtype);
  std::uint64_t count = 1;
  for (Index d : shape) {
    if (d < 0 || !io::detail::checked_mul_u64(count, static_cast<std::uint64_t>(d),
                                              static_cast<std::uint64_t>(PTRDIFF_MAX), count)) {
      throw ValueError(str_cat("save_npy: invalid shape ", shape_string(shape)));
    }
  }
  if (count * dtype_size(dtype) != nbytes) {
    throw ValueError(str_cat("save_npy: shape ", shape_string(shape), " of ", descr, " needs ",
                             count * dtype_size(dtype), " bytes, got ", nbytes));
  }
  std::string dict = str_cat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (");
  for (std::size_t i = 0; i < shape.size(); ++i) dict += str_cat(i ? ", " : "", shape[i]);
  dict += shape.size() == 1 ? ",), }" : "), }";
  // NumPy pads with spaces and a final '\n' so that the data start on a 64-byte boundary.
  std::size_t preamble = 10;
  std::uint8_t major = 1;
  if (dict.size() + 1 + 64 > 65535) {
    preamble = 12;
    major = 2;
  }
  const std::size_t unpadded = preamble + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  std::vector<std::uint8_t> out(preamble + dict.size() + nbytes);
  std::memcpy(out.data(), "\x93NUMPY", 6);
  out[6] = major;
  out[7] = 0;
  if (major == 1) {
    detail::store_le(out.data() + 8, static_cast<std::uint16_t>(dict.size()));
  } else {
    detail::store_le(out.data() + 8, static_cast<std::uint32_t>(dict.size()));
  }
  std::memcpy(out.data() + preamble, dict.data(), dict.size());
  if (nbytes > 0) std::memcpy(out.data() + preamble + dict.size(), bytes, nbytes);
  return out;
}

template <class T>
void save_npy(const std::string& path, const T* data, const std::vector<Index>& shape, DType as,
              const AtomicWriteOptions& options) {
  std::uint64_t count = 1;
  for (Index d : shape) {
    if (d < 0 || !io::detail::checked_mul_u64(count, static_cast<std::uint64_t>(d),
                                              static_cast<std::uint64_t>(PTRDIFF_MAX) / 8, count)) {
      throw ValueError(str_cat("save_npy ", path, ": invalid shape ", shape_string(shape)));
    }
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(count) * dtype_size(as));
  encode_elements(data, static_cast<std::size_t>(count), as, bytes.data(), str_cat("save_npy ", path));
  write_file_atomic(path, npy_file_bytes(as, shape, bytes.data(), bytes.size()), options);
}

}  // namespace io
}  // namespace sma
