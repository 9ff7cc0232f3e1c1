// sma/io/dtype.hpp: element types of the array files (safetensors, .npy), IEEE half / bfloat16 conversion, and the
// conversions between stored bytes (always little-endian) and C++ scalars.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace sma {
namespace io {

/// Element type of a stored array. Names follow safetensors ("F64", "BF16", ...); `.npy` maps a subset (npy.hpp).
///   F64, F32      IEEE binary64 / binary32
///   F16           IEEE binary16 (1 sign, 5 exponent, 10 mantissa bits)
///   BF16          bfloat16 (the upper 16 bits of a binary32)
///   I64, I32, U8  two's complement / unsigned integers
///   BOOL          one byte per element, 0 or 1
enum class DType : std::uint8_t { F64, F32, F16, BF16, I64, I32, U8, BOOL };

/// Bytes per element.
inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64:
    case DType::I64:
      return 8;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::U8:
    case DType::BOOL:
      return 1;
  }
  return 0;
}

/// The safetensors spelling ("F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL").
inline const char* to_string(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

/// The dtype spelled `s` (exact, case-sensitive, as safetensors writes it), or nothing.
inline std::optional<DType> dtype_from_string(const std::string& s) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::U8, DType::BOOL}) {
    if (s == to_string(t)) return t;
  }
  return std::nullopt;
}

/// The dtype spelled `s`; throws ValueError listing the known spellings otherwise.
inline DType parse_dtype(const std::string& s) {
  if (auto t = dtype_from_string(s)) return *t;
  throw ValueError(str_cat("unknown dtype \"", s, "\" (known: F64, F32, F16, BF16, I64, I32, U8, BOOL)"));
}

inline bool is_floating(DType t) {
  return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16;
}

/// The dtype that stores T unchanged: double F64, float F32, int64 I64, int32 I32, uint8 U8, bool BOOL.
template <class T>
struct DTypeOf;
template <>
struct DTypeOf<double> : std::integral_constant<DType, DType::F64> {};
template <>
struct DTypeOf<float> : std::integral_constant<DType, DType::F32> {};
template <>
struct DTypeOf<std::int64_t> : std::integral_constant<DType, DType::I64> {};
template <>
struct DTypeOf<std::int32_t> : std::integral_constant<DType, DType::I32> {};
template <>
struct DTypeOf<std::uint8_t> : std::integral_constant<DType, DType::U8> {};
template <>
struct DTypeOf<bool> : std::integral_constant<DType, DType::BOOL> {};
template <class T>
inline constexpr DType dtype_of = DTypeOf<T>::value;

// ---- binary16 and bfloat16 ----
// Narrowing rounds to nearest, ties to even; overflow gives infinity; NaN stays NaN (quiet, sign kept). The double
// overloads round once, directly from the double (going through float first could round twice and be off by one
// ulp). Widening is exact.

/// IEEE binary16 bits of `x`, rounded to nearest even.
inline std::uint16_t double_to_half(double x);
inline std::uint16_t float_to_half(float x) { return double_to_half(static_cast<double>(x)); }
/// bfloat16 bits of `x`, rounded to nearest even.
inline std::uint16_t double_to_bf16(double x);
inline std::uint16_t float_to_bf16(float x) { return double_to_bf16(static_cast<double>(x)); }
/// Exact value of binary16 / bfloat16 bits (every such value is a float).
inline float half_to_float(std::uint16_t h);
inline float bf16_to_float(std::uint16_t b);

/// Decodes `n` stored elements of dtype `src` from little-endian `bytes` into `out`.
///   floating dtypes -> floating T; integer and BOOL dtypes -> integral or floating T.
/// Throws KeyError when the dtype cannot be represented as T (a float dtype into an integer T, `where` names the
/// tensor), ValueError when an integer does not fit T (naming the flat index).
template <class T>
void decode_elements(DType src, const std::uint8_t* bytes, std::size_t n, T* out, const std::string& where);

/// decode_elements into a fresh vector (std::vector<bool> included, which has no data()).
template <class T>
std::vector<T> decode_vector(DType src, const std::uint8_t* bytes, std::size_t n, const std::string& where);

/// Encodes `n` values of T as dtype `dst`, little-endian, into `out` (n * dtype_size(dst) bytes).
///   floating T -> any floating dtype (rounded to nearest even); integral T -> any integer dtype (range-checked)
///   or any floating dtype. Throws ValueError for a floating T into an integer dtype or a value out of range.
template <class T>
void encode_elements(const T* in, std::size_t n, DType dst, std::uint8_t* out, const std::string& where);

// ---- implementation ----

namespace detail {

inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// Byte-order independent loads and stores; compilers turn these loops into single moves.
template <class U>
U load_le(const std::uint8_t* p) {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | (static_cast<U>(p[i]) << (8 * i)));
  return v;
}
template <class U>
void store_le(std::uint8_t* p, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// a * b into `out`, or false when the product exceeds `limit` (overflow-safe size arithmetic for file headers).
inline bool checked_mul_u64(std::uint64_t a, std::uint64_t b, std::uint64_t limit, std::uint64_t& out) {
  if (a != 0 && b > limit / a) return false;
  out = a * b;
  return out <= limit;
}

template <class To, class From>
To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// Rounds a double to a binary format with `kExp` exponent bits and `kMan` mantissa bits (nearest, ties to even).
template <int kExp, int kMan>
std::uint16_t narrow_float(double x) {
  const std::uint64_t u = bit_cast<std::uint64_t>(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 63) << (kExp + kMan));
  const int dexp = static_cast<int>((u >> 52) & 0x7FF);
  const std::uint64_t dman = u & ((std::uint64_t{1} << 52) - 1);
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  constexpr std::uint16_t kExpMask = static_cast<std::uint16_t>(((1 << kExp) - 1) << kMan);
  if (dexp == 0x7FF) {
    if (dman == 0) return static_cast<std::uint16_t>(sign | kExpMask);
    // NaN: keep the top payload bits, force the quiet bit so the result cannot turn into infinity.
    const auto payload = static_cast<std::uint16_t>(dman >> (52 - kMan));
    return static_cast<std::uint16_t>(sign | kExpMask | payload | (1u << (kMan - 1)));
  }
  if (dexp == 0) return sign;  // zero or a double subnormal, far below the smallest target subnormal
  const int e = dexp - 1023;
  const std::uint64_t sig = dman | (std::uint64_t{1} << 52);  // 53 significant bits, value sig * 2^(e-52)
  constexpr int kEmin = 1 - kBias;
  int shift;
  std::uint64_t base;
  if (e >= kEmin) {
    shift = 52 - kMan;
    base = static_cast<std::uint64_t>(e + kBias) << kMan;  // the implicit bit of sig adds one more to the exponent
    base -= std::uint64_t{1} << kMan;
  } else {
    shift = 52 - kMan + (kEmin - e);
    base = 0;
    if (shift > 60) return sign;  // below a quarter of the smallest subnormal
  }
  std::uint64_t q = sig >> shift;
  const std::uint64_t rem = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;
  // A carry out of the mantissa moves into the exponent field, which is exactly the next binade (or infinity).
  const std::uint64_t bits = base + q;
  if (bits >= kExpMask) return static_cast<std::uint16_t>(sign | kExpMask);
  return static_cast<std::uint16_t>(sign | bits);
}

template <int kExp, int kMan>
double widen_float(std::uint16_t h) {
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  const bool neg = (h >> (kExp + kMan)) & 1;
  const int ex = (h >> kMan) & ((1 << kExp) - 1);
  const int man = h & ((1 << kMan) - 1);
  double v;
  if (ex == (1 << kExp) - 1) {
    v = man == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (ex == 0) {
    v = std::ldexp(static_cast<double>(man), 1 - kBias - kMan);
  } else {
    v = std::ldexp(static_cast<double>(man | (1 << kMan)), ex - kBias - kMan);
  }
  return neg ? -v : v;
}

// Reads element i of a stored array as the widest type of its kind.
inline double load_floating(DType src, const std::uint8_t* p) {
  switch (src) {
    case DType::F64: return bit_cast<double>(load_le<std::uint64_t>(p));
    case DType::F32: return static_cast<double>(bit_cast<float>(load_le<std::uint32_t>(p)));
    case DType::F16: return static_cast<double>(half_to_float(load_le<std::uint16_t>(p)));
    case DType::BF16: return static_cast<double>(bf16_to_float(load_le<std::uint16_t>(p)));
    default: return 0.0;
  }
}
inline std::int64_t load_integer(DType src, const std::uint8_t* p) {
  switch (src) {
    case DType::I64: return static_cast<std::int64_t>(load_le<std::uint64_t>(p));
    case DType::I32: return static_cast<std::int32_t>(load_le<std::uint32_t>(p));
    case DType::U8:
    case DType::BOOL: return *p;
    default: return 0;
  }
}

template <class T>
bool fits_integer(std::int64_t v) {
  if constexpr (std::is_same<T, bool>::value) {
    return v == 0 || v == 1;
  } else if constexpr (std::is_signed<T>::value) {
    return v >= static_cast<std::int64_t>(std::numeric_limits<T>::min()) &&
           v <= static_cast<std::int64_t>(std::numeric_limits<T>::max());
  } else {
    return v >= 0 && static_cast<std::uint64_t>(v) <= static_cast<std::uint64_t>(std::numeric_limits<T>::max());
  }
}

}  // namespace detail

inline std::uint16_t double_to_half(double x) { return detail::narrow_float<5, 10>(x); }
inline std::uint16_t double_to_bf16(double x) { return detail::narrow_float<8, 7>(x); }
inline float half_to_float(std::uint16_t h) { return static_cast<float>(detail::widen_float<5, 10>(h)); }
inline float bf16_to_float(std::uint16_t b) {
  // bfloat16 is the top half of a binary32, so widening is a shift (and keeps NaN payloads).
  return detail::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

template <class T>
void decode_elements(DType src, const std::uint8_t* bytes, std::size_t n, T* out, const std::string& where) {
  static_assert(std::is_arithmetic<T>::value, "sma::io: tensors load into arithmetic scalar types only");
  const std::size_t w = dtype_size(src);
  if (is_floating(src)) {
    if constexpr (std::is_floating_point<T>::value) {
      if (src == dtype_of<T> && detail::host_is_little_endian()) {
        if (n > 0) std::memcpy(out, bytes, n * sizeof(T));
        return;
      }
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::load_floating(src, bytes + i * w));
      return;
    } else {
      throw KeyError(str_cat(where, ": stored as floating dtype ", to_string(src),
                             ", which does not convert to an integer type; load it as float or double"));
    }
  }
  if constexpr (std::is_floating_point<T>::value) {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::load_integer(src, bytes + i * w));
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t v = detail::load_integer(src, bytes + i * w);
      if (!detail::fits_integer<T>(v)) {
        throw ValueError(str_cat(where, ": value ", v, " at flat index ", i, " (dtype ", to_string(src),
                                 ") does not fit the requested integer type"));
      }
      out[i] = static_cast<T>(v);
    }
  }
}

template <class T>
std::vector<T> decode_vector(DType src, const std::uint8_t* bytes, std::size_t n, const std::string& where) {
  if constexpr (std::is_same<T, bool>::value) {
    std::unique_ptr<bool[]> tmp(new bool[n > 0 ? n : 1]);
    decode_elements(src, bytes, n, tmp.get(), where);
    return std::vector<bool>(tmp.get(), tmp.get() + n);
  } else {
    std::vector<T> out(n);
    decode_elements(src, bytes, n, out.data(), where);
    return out;
  }
}

template <class T>
void encode_elements(const T* in, std::size_t n, DType dst, std::uint8_t* out, const std::string& where) {
  static_assert(std::is_arithmetic<T>::value, "sma::io: tensors store arithmetic scalar types only");
  const std::size_t w = dtype_size(dst);
  if (!is_floating(dst) && std::is_floating_point<T>::value) {
    throw ValueError(str_cat(where, ": a floating-point tensor cannot be stored as integer dtype ", to_string(dst)));
  }
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t* p = out + i * w;
    switch (dst) {
      case DType::F64: detail::store_le(p, detail::bit_cast<std::uint64_t>(static_cast<double>(in[i]))); break;
      case DType::F32: detail::store_le(p, detail::bit_cast<std::uint32_t>(static_cast<float>(in[i]))); break;
      case DType::F16: detail::store_le(p, double_to_half(static_cast<double>(in[i]))); break;
      case DType::BF16: detail::store_le(p, double_to_bf16(static_cast<double>(in[i]))); break;
      default:
        if constexpr (std::is_integral<T>::value) {
          if constexpr (std::is_unsigned<T>::value && sizeof(T) >= 8) {
            if (in[i] > static_cast<T>(std::numeric_limits<std::int64_t>::max())) {
              throw ValueError(str_cat(where, ": value ", in[i], " at flat index ", i, " does not fit dtype ",
                                       to_string(dst)));
            }
          }
          const auto v = static_cast<std::int64_t>(in[i]);
          const bool ok = dst == DType::I64   ? true
                          : dst == DType::I32 ? detail::fits_integer<std::int32_t>(v)
                          : dst == DType::U8  ? detail::fits_integer<std::uint8_t>(v)
                                              : detail::fits_integer<bool>(v);
          if (!ok) {
            throw ValueError(str_cat(where, ": value ", v, " at flat index ", i, " does not fit dtype ",
                                     to_string(dst)));
          }
          if (dst == DType::I64) detail::store_le(p, static_cast<std::uint64_t>(v));
          else if (dst == DType::I32) detail::store_le(p, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
          else *p = static_cast<std::uint8_t>(v);
        }
        break;
    }
  }
}

}  // namespace io
}  // namespace sma
