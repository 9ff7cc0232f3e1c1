// sma/data/idx.hpp: the IDX array format of (Fashion-)MNIST, read plain or gzip-compressed (through zlib).
//
// FORMAT (LeCun et al.): a 4-byte magic 0x00 0x00 <type> <rank>, then `rank` big-endian u32 extents, then the
// elements in C order, big-endian. Types: 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64. Files ending
// in .gz (or any gzip stream: zlib detects it) are decompressed on the fly; offsets in messages then count bytes
// of the decompressed stream. See docs/data.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/index.hpp>

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace sma::data {

/// Element types of IDX files (the third magic byte).
enum class IdxType : std::uint8_t { u8 = 0x08, i8 = 0x09, i16 = 0x0B, i32 = 0x0C, f32 = 0x0D, f64 = 0x0E };

inline const char* to_string(IdxType t) {
  switch (t) {
    case IdxType::u8:
      return "u8";
    case IdxType::i8:
      return "i8";
    case IdxType::i16:
      return "i16";
    case IdxType::i32:
      return "i32";
    case IdxType::f32:
      return "f32";
    case IdxType::f64:
      return "f64";
  }
  return "?";
}
/// Bytes per element.
inline Index idx_type_size(IdxType t) {
  switch (t) {
    case IdxType::u8:
    case IdxType::i8:
      return 1;
    case IdxType::i16:
      return 2;
    case IdxType::i32:
    case IdxType::f32:
      return 4;
    case IdxType::f64:
      return 8;
  }
  return 0;
}

/// An IDX array, or its first items along axis 0.
///
/// `dims` are the extents read (dims[0] <= file_items when a limit was given); `bytes` hold the elements as stored
/// (big-endian), dims product times idx_type_size(type) of them.
struct IdxArray {
  IdxType type = IdxType::u8;
  std::vector<Index> dims;
  Index file_items = 0;  ///< extent of axis 0 in the file
  std::vector<std::uint8_t> bytes;
  std::string origin;  ///< the file, for messages

  /// Elements per item (the product of dims[1:]; 1 for a rank-1 array).
  Index item_size() const {
    Index n = 1;
    for (std::size_t i = 1; i < dims.size(); ++i) n *= dims[i];
    return n;
  }
  Index numel() const { return dims.empty() ? 0 : dims[0] * item_size(); }
  /// Element `flat` (row-major) converted to double.
  double at(Index flat) const;
};

/// Reads an IDX file, plain or gzip-compressed. With max_items >= 0 only the first min(max_items, extent) items
/// along axis 0 are read (and the data after them is not looked at); with max_items < 0 the whole file is read
/// and must end right after the data. Every violation is an IoError naming the file, the byte offset and the rule:
/// the file cannot be opened; a corrupt gzip stream; shorter than the 4-byte magic; magic not starting with two
/// zero bytes; an unknown type code; rank 0; the extents truncated; an element count that overflows; the data
/// shorter than the extents require; bytes after the data.
inline IdxArray read_idx(const std::string& path, Index max_items = -1);

/// The same checks on bytes in memory; `origin` names them in messages.
inline IdxArray parse_idx(const std::vector<std::uint8_t>& bytes, const std::string& origin, Index max_items = -1);

// ---------------------------------------------------------------------------------------------------------------
// Implementation
// ---------------------------------------------------------------------------------------------------------------

namespace detail {

/// Sequential reads from a zlib gzFile (which also reads files that are not compressed), with the offset.
class GzSource {
 public:
  explicit GzSource(const std::string& path) : path_(path) {
    file_ = gzopen(path.c_str(), "rb");
    if (!file_) {
      const int err = errno;
      throw IoError(str_cat(path, ": cannot open for reading", err ? str_cat(": ", std::strerror(err)) : ""));
    }
    gzbuffer(file_, 1 << 17);
  }
  GzSource(const GzSource&) = delete;
  GzSource& operator=(const GzSource&) = delete;
  ~GzSource() {
    if (file_) gzclose(file_);
  }
  /// Reads up to n bytes; returns how many were read (fewer only at the end of the data).
  std::size_t read(void* dst, std::size_t n) {
    std::size_t done = 0;
    auto* out = static_cast<unsigned char*>(dst);
    while (done < n) {
      // Moderate chunks, so that a decompression error is located within kChunk bytes (zlib reports none of a
      // failed call's bytes).
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - done, kChunk));
      const int got = gzread(file_, out + done, chunk);
      if (got < 0) fail();
      done += static_cast<std::size_t>(got);
      offset_ += got;
      if (static_cast<unsigned>(got) < chunk) {
        int errnum = Z_OK;
        gzerror(file_, &errnum);
        if (errnum != Z_OK) fail();  // e.g. a compressed stream cut short
        break;
      }
    }
    return done;
  }
  Index offset() const { return offset_; }
  /// How offsets are counted, for messages.
  std::string where() const {
    return str_cat(path_, ": byte offset ", offset_, gzdirect(file_) ? "" : " of the decompressed data");
  }

 private:
  static constexpr std::size_t kChunk = std::size_t(1) << 16;
  [[noreturn]] void fail() {
    int errnum = Z_OK;
    const char* m = gzerror(file_, &errnum);
    std::string msg = m ? m : "unknown error";
    if (msg.rfind(path_ + ": ", 0) == 0) msg.erase(0, path_.size() + 2);  // zlib prefixes the path
    throw IoError(
        str_cat(where(), ": gzip read error within the next ", kChunk, " bytes: ", msg, " (zlib error ", errnum, ")"));
  }
  std::string path_;
  gzFile file_ = nullptr;
  Index offset_ = 0;
};

/// Sequential reads from bytes in memory.
class MemorySource {
 public:
  MemorySource(const std::vector<std::uint8_t>& bytes, const std::string& origin) : bytes_(bytes), origin_(origin) {}
  std::size_t read(void* dst, std::size_t n) {
    const std::size_t left = bytes_.size() - static_cast<std::size_t>(offset_);
    const std::size_t take = std::min(n, left);
    if (take) std::memcpy(dst, bytes_.data() + offset_, take);
    offset_ += static_cast<Index>(take);
    return take;
  }
  Index offset() const { return offset_; }
  std::string where() const { return str_cat(origin_, ": byte offset ", offset_); }

 private:
  const std::vector<std::uint8_t>& bytes_;
  std::string origin_;
  Index offset_ = 0;
};

template <class Source>
IdxArray read_idx_from(Source& src, const std::string& origin, Index max_items) {
  IdxArray a;
  a.origin = origin;
  unsigned char magic[4];
  const Index at_magic = src.offset();
  if (src.read(magic, 4) != 4)
    throw IoError(str_cat(src.where(), ": truncated: the file ends inside the 4-byte IDX magic (which starts at byte ",
                          at_magic, ")"));
  if (magic[0] != 0 || magic[1] != 0)
    throw IoError(str_cat(origin, ": byte offset 0: bad IDX magic: the first two bytes are ", int(magic[0]), " and ",
                          int(magic[1]), ", expected 0 and 0"));
  const unsigned code = magic[2];
  if (code != 0x08 && code != 0x09 && code != 0x0B && code != 0x0C && code != 0x0D && code != 0x0E)
    throw IoError(str_cat(origin, ": byte offset 2: unknown IDX type code 0x", std::hex, code,
                          " (expected 08, 09, 0B, 0C, 0D or 0E)"));
  a.type = static_cast<IdxType>(code);
  const int rank = magic[3];
  if (rank == 0) throw IoError(str_cat(origin, ": byte offset 3: IDX rank 0 (an array needs at least one axis)"));
  a.dims.resize(static_cast<std::size_t>(rank));
  const Index elem = idx_type_size(a.type);
  Index item_bytes = elem;  // bytes of one item (all axes but the first)
  const Index limit = std::numeric_limits<Index>::max() / 2;
  for (int i = 0; i < rank; ++i) {
    unsigned char d[4];
    const Index at = src.offset();
    const std::size_t got = src.read(d, 4);
    if (got != 4)
      throw IoError(str_cat(src.where(), ": truncated: the file ends inside extent ", i, " of ", rank,
                            " (which starts at byte ", at, ")"));
    const Index v = (Index(d[0]) << 24) | (Index(d[1]) << 16) | (Index(d[2]) << 8) | Index(d[3]);
    a.dims[static_cast<std::size_t>(i)] = v;
    if (i > 0) {
      if (v != 0 && item_bytes > limit / v)
        throw IoError(str_cat(origin, ": byte offset ", at, ": extents ", shape_string(a.dims),
                              " give more elements than can be addressed"));
      item_bytes *= v;
    }
  }
  a.file_items = a.dims[0];
  const std::vector<Index> file_dims = a.dims;
  if (a.file_items != 0 && item_bytes > limit / a.file_items)
    throw IoError(str_cat(origin, ": byte offset 4: extents ", shape_string(file_dims),
                          " give more elements than can be addressed"));
  const Index items = max_items < 0 ? a.file_items : std::min(max_items, a.file_items);
  a.dims[0] = items;
  const Index data_start = src.offset();
  const Index want = items * item_bytes;
  a.bytes.resize(static_cast<std::size_t>(want));
  const std::size_t got = src.read(a.bytes.data(), static_cast<std::size_t>(want));
  if (static_cast<Index>(got) != want)
    throw IoError(str_cat(src.where(), ": truncated: ", items, " items of extents ", shape_string(file_dims), " (",
                          to_string(a.type), ") need ", want, " data bytes from byte ", data_start,
                          ", but the file ends after ", got));
  if (max_items < 0) {
    unsigned char extra[256];
    const Index end_of_data = src.offset();
    Index trailing = 0;
    for (std::size_t n; (n = src.read(extra, sizeof extra)) > 0;) trailing += static_cast<Index>(n);
    if (trailing > 0)
      throw IoError(str_cat(origin, ": byte offset ", end_of_data, ": ", trailing,
                            " unexpected bytes after the data of extents ", shape_string(a.dims)));
  }
  return a;
}

}  // namespace detail

inline double IdxArray::at(Index flat) const {
  const std::uint8_t* p = bytes.data() + flat * idx_type_size(type);
  auto be = [p](int n) {
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
    return v;
  };
  switch (type) {
    case IdxType::u8:
      return p[0];
    case IdxType::i8:
      return static_cast<std::int8_t>(p[0]);
    case IdxType::i16:
      return static_cast<std::int16_t>(static_cast<std::uint16_t>(be(2)));
    case IdxType::i32:
      return static_cast<std::int32_t>(static_cast<std::uint32_t>(be(4)));
    case IdxType::f32: {
      const auto u = static_cast<std::uint32_t>(be(4));
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case IdxType::f64: {
      const std::uint64_t u = be(8);
      double d;
      std::memcpy(&d, &u, 8);
      return d;
    }
  }
  return 0;
}

inline IdxArray read_idx(const std::string& path, Index max_items) {
  detail::GzSource src(path);
  return detail::read_idx_from(src, path, max_items);
}

inline IdxArray parse_idx(const std::vector<std::uint8_t>& bytes, const std::string& origin, Index max_items) {
  detail::MemorySource src(bytes, origin);
  return detail::read_idx_from(src, origin, max_items);
}

}  // namespace sma::data
