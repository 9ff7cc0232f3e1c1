// sma/core/error.hpp: the exception hierarchy. Every message names the offending shape, value, name or offset.
#pragma once

#include <sma/core/index.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sma {

/// Base of every exception thrown by sma.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor has the wrong rank or extent (message: "<where>: expected (B, L, 16), got (2, 7, 8)").
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A configuration or argument value is out of range (a window of 0, an unknown activation...).
class ValueError : public Error {
 public:
  using Error::Error;
};

/// Non-finite numbers where finite ones are required (raised only when `Context::check_finite` is on).
class NumericError : public Error {
 public:
  using Error::Error;
};

/// A file is malformed, truncated, or cannot be read or written; the message says which file and where.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A named tensor is missing, unexpected, or of the wrong dtype/shape in a checkpoint or case file.
class KeyError : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline void append_all(std::ostringstream&) {}
template <class A, class... Rest>
void append_all(std::ostringstream& os, const A& a, const Rest&... rest) {
  os << a;
  append_all(os, rest...);
}

}  // namespace detail

/// Concatenates its arguments with operator<< into one string (message building for the exceptions above).
template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append_all(os, args...);
  return os.str();
}

/// "(2, 7, 8)" for any container of integers.
template <class Dims>
std::string shape_string(const Dims& dims) {
  std::ostringstream os;
  os << '(';
  bool first = true;
  for (auto d : dims) {
    if (!first) os << ", ";
    os << static_cast<long long>(d);
    first = false;
  }
  os << ')';
  return os.str();
}

/// Throws `ValueError(what)` unless `cond` holds.
inline void require(bool cond, const std::string& what) {
  if (!cond) throw ValueError(what);
}

}  // namespace sma
