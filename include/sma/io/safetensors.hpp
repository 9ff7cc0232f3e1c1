// sma/io/safetensors.hpp: reading and writing safetensors files (the checkpoint and golden-case format).
//
// FORMAT (huggingface safetensors): bytes 0..7 hold N, an unsigned 64-bit little-endian integer; bytes 8..8+N-1 a
// UTF-8 JSON object {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
// "__metadata__": {string: string}}; then the data block, in which every tensor's bytes lie at [begin, end)
// relative to byte 8+N, row-major and little-endian. The tensors cover the data block exactly: no gaps, no overlaps,
// no trailing bytes. See docs/io.md.
#pragma once

#include <sma/core/error.hpp>
#include <sma/core/tensor.hpp>
#include <sma/io/atomic_file.hpp>
#include <sma/io/dtype.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace sma {
namespace io {

/// What the header says about one tensor.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F64;
  std::vector<Index> shape;  // [] is a scalar (one element)
  std::uint64_t begin = 0;   // byte offsets in the data block, [begin, end)
  std::uint64_t end = 0;

  Index numel() const {
    Index n = 1;
    for (Index d : shape) n *= d;  // validated on load: cannot overflow
    return n;
  }
  std::size_t nbytes() const { return static_cast<std::size_t>(end - begin); }
};

/// Raw stored bytes of one tensor (little-endian, row-major); valid while the SafetensorsFile lives.
struct ByteView {
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;
};

/// A safetensors file, read whole into memory and validated.
///
/// WHAT: the constructor reads the file and checks every rule of the format (below); accessors then never fail
///   on the file's structure, only on the caller's request (missing name, wrong rank, unconvertible dtype).
/// VALIDATION (each an IoError naming the file and the byte offset or tensor):
///   file shorter than 8 bytes; header length N > file size - 8 or N > kMaxHeaderBytes; header not well-formed
///   JSON (nlohmann's message) or not starting with '{' or not an object; a key repeated in any JSON object; an
///   entry that is not an object or lacks "dtype"/"shape"/"data_offsets" or has them of the wrong JSON type; an
///   unknown dtype; a shape element that is negative or not an integer; element or byte counts that overflow 64
///   bits; begin > end; end past the data block; end - begin != product(shape) * dtype_size; tensors overlapping;
///   gaps between tensors or trailing bytes after them; "__metadata__" not a string -> string object.
/// CONVERSIONS (tensor, values, read_into): F64/F32/F16/BF16 into float or double; I64/I32/U8/BOOL into integer
///   types (range-checked, ValueError) or floating types. A floating dtype into an integer type is a KeyError.
/// ERRORS from accessors: KeyError for a missing name or metadata key (listing what the file has); ShapeError for a
///   rank or shape mismatch (naming the tensor and both shapes).
class SafetensorsFile {
 public:
  /// Largest header accepted (the reference implementation's limit).
  static constexpr std::uint64_t kMaxHeaderBytes = 100000000;

  /// Reads and validates the file at `path`.
  explicit SafetensorsFile(const std::string& path) : origin_(path), bytes_(read_file_bytes(path)) { parse(); }
  /// Validates bytes already in memory; `origin` names them in messages.
  SafetensorsFile(std::vector<std::uint8_t> bytes, std::string origin)
      : origin_(std::move(origin)), bytes_(std::move(bytes)) {
    parse();
  }

  /// The path (or origin) given at construction.
  const std::string& path() const { return origin_; }
  /// Tensor names in sorted order.
  std::vector<std::string> names() const;
  std::size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// dtype, shape and offsets of `name`; KeyError if absent.
  const TensorInfo& info(const std::string& name) const { return find(name); }
  /// The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has_metadata(const std::string& key) const { return metadata_.count(key) != 0; }
  /// The metadata value under `key`; KeyError naming the key, the file and the keys present otherwise.
  const std::string& metadata_value(const std::string& key) const;

  /// Tensor `name` converted to T, which must have rank R (ShapeError otherwise). Shape [] loads as rank 0.
  template <class T, int R>
  Tensor<T, R> tensor(const std::string& name) const;
  /// Same, and the shape must equal `expected` exactly (ShapeError with both shapes otherwise).
  template <class T, int R>
  Tensor<T, R> tensor(const std::string& name, const std::array<Index, R>& expected) const;
  /// All elements of `name`, row-major, converted to T (any rank).
  template <class T>
  std::vector<T> values(const std::string& name) const;
  std::vector<double> values_as_double(const std::string& name) const { return values<double>(name); }
  /// Converts `name` into `out`, which holds product(expected_shape) elements; ShapeError unless the stored shape
  /// equals `expected_shape` (for filling a Param in place).
  template <class T>
  void read_into(const std::string& name, T* out, const std::vector<Index>& expected_shape) const;
  /// The stored bytes of `name`.
  ByteView raw(const std::string& name) const;
  /// File offset of the data block (8 + N).
  std::uint64_t data_offset() const { return data_start_; }

 private:
  void parse();
  const TensorInfo& find(const std::string& name) const;
  IoError error(const std::string& what) const { return IoError(str_cat(origin_, ": ", what)); }
  std::string where(const std::string& name) const { return str_cat(origin_, ": tensor '", name, "'"); }

  std::string origin_;
  std::vector<std::uint8_t> bytes_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file in memory and saves it atomically.
///
/// WHAT: add tensors (each stored as its own dtype or converted to another), set metadata, then save(path).
/// ENSURES on save: tensors in sorted order of their names, back to back from offset 0; the header is compact JSON
///   padded with spaces to a multiple of 8 bytes (so the data block is 8-byte aligned); the file is replaced
///   atomically (write_file_atomic): after a failure the old file is unchanged and no temporary file remains.
/// ERRORS: KeyError for a repeated tensor name or the reserved name "__metadata__"; ValueError for a negative extent,
///   a byte count that does not match the shape, a value that does not fit the requested dtype, or names / metadata
///   that are not valid UTF-8; IoError from save.
class SafetensorsWriter {
 public:
  /// Stores `t` under `name` in its own dtype (double F64, float F32, int64 I64, int32 I32, uint8 U8, bool BOOL).
  template <class T, int R>
  SafetensorsWriter& add(const std::string& name, const Tensor<T, R>& t) {
    return add(name, t, dtype_of<T>);
  }
  /// Stores `t` converted to `as` (e.g. a double tensor as F32 or BF16: rounded to nearest even).
  template <class T, int R>
  SafetensorsWriter& add(const std::string& name, const Tensor<T, R>& t, DType as) {
    const auto d = dims_of(t);
    return add(name, t.data(), std::vector<Index>(d.begin(), d.end()), as);
  }
  /// Stores product(shape) row-major elements from `data` as dtype `as`.
  template <class T>
  SafetensorsWriter& add(const std::string& name, const T* data, const std::vector<Index>& shape, DType as);
  template <class T>
  SafetensorsWriter& add(const std::string& name, const T* data, const std::vector<Index>& shape) {
    return add(name, data, shape, dtype_of<T>);
  }
  /// Stores bytes already encoded as little-endian `dtype`; `nbytes` must equal product(shape) * dtype_size.
  SafetensorsWriter& add_raw(const std::string& name, DType dtype, const std::vector<Index>& shape, const void* bytes,
                             std::size_t nbytes);
  /// Sets (or replaces) one "__metadata__" entry.
  SafetensorsWriter& set_metadata(const std::string& key, const std::string& value) {
    metadata_[key] = value;
    return *this;
  }

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::size_t size() const { return entries_.size(); }
  /// The complete file content.
  std::vector<std::uint8_t> to_bytes() const;
  /// Writes the file atomically (see write_file_atomic; `options` carries the testing hook).
  void save(const std::string& path, const AtomicWriteOptions& options = {}) const {
    write_file_atomic(path, to_bytes(), options);
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<Index> shape;
    std::vector<std::uint8_t> bytes;
  };
  Entry& insert(const std::string& name, DType dtype, const std::vector<Index>& shape);

  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// Loads one tensor from a file (reads and validates the whole file; use SafetensorsFile for several).
template <class T, int R>
Tensor<T, R> load_safetensor(const std::string& path, const std::string& name) {
  return SafetensorsFile(path).tensor<T, R>(name);
}

// ---- implementation ----

namespace detail {

inline std::string list_names(const std::vector<std::string>& names, std::size_t max_shown = 20) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < max_shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > max_shown) s += str_cat(", ... (", names.size() - max_shown, " more)");
  return s.empty() ? std::string("none") : s;
}

inline std::string rank_pattern(int r) {
  std::string s = "(";
  for (int i = 0; i < r; ++i) s += i ? ", *" : "*";
  return s + ")";
}

// Element count of `shape`, with a ValueError naming `where` when it is negative or overflows.
inline std::uint64_t checked_numel(const std::vector<Index>& shape, std::size_t elem_bytes, const std::string& where) {
  std::uint64_t n = 1;
  for (Index d : shape) {
    if (d < 0) throw ValueError(str_cat(where, ": negative extent in shape ", shape_string(shape)));
    if (!checked_mul_u64(n, static_cast<std::uint64_t>(d), static_cast<std::uint64_t>(PTRDIFF_MAX), n)) {
      throw ValueError(str_cat(where, ": shape ", shape_string(shape), " has too many elements"));
    }
  }
  std::uint64_t b = 0;
  if (!checked_mul_u64(n, elem_bytes, static_cast<std::uint64_t>(PTRDIFF_MAX), b)) {
    throw ValueError(str_cat(where, ": shape ", shape_string(shape), " needs more bytes than fit in memory"));
  }
  return n;
}

}  // namespace detail

inline std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

inline const TensorInfo& SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    throw KeyError(str_cat(origin_, ": no tensor named '", name, "' (the file has ", tensors_.size(),
                           " tensors: ", detail::list_names(names()), ")"));
  }
  return it->second;
}

inline const std::string& SafetensorsFile::metadata_value(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) {
    std::vector<std::string> keys;
    for (const auto& kv : metadata_) keys.push_back(kv.first);
    throw KeyError(str_cat(origin_, ": no metadata key '", key, "' (present: ", detail::list_names(keys, 40), ")"));
  }
  return it->second;
}

inline ByteView SafetensorsFile::raw(const std::string& name) const {
  const TensorInfo& ti = find(name);
  return ByteView{bytes_.data() + data_start_ + ti.begin, ti.nbytes()};
}

template <class T, int R>
Tensor<T, R> SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo& ti = find(name);
  if (static_cast<int>(ti.shape.size()) != R) {
    throw ShapeError(str_cat(where(name), ": stored shape ", shape_string(ti.shape), " has rank ", ti.shape.size(),
                             ", requested rank ", R, " ", detail::rank_pattern(R)));
  }
  std::array<Index, R> d{};
  for (int i = 0; i < R; ++i) d[static_cast<std::size_t>(i)] = ti.shape[static_cast<std::size_t>(i)];
  Tensor<T, R> t = uninitialized<T, R>(d);
  decode_elements(ti.dtype, bytes_.data() + data_start_ + ti.begin, static_cast<std::size_t>(ti.numel()), t.data(),
                  where(name));
  return t;
}

template <class T, int R>
Tensor<T, R> SafetensorsFile::tensor(const std::string& name, const std::array<Index, R>& expected) const {
  const TensorInfo& ti = find(name);
  if (!std::equal(ti.shape.begin(), ti.shape.end(), expected.begin(), expected.end())) {
    throw ShapeError(str_cat(where(name), ": expected shape ", shape_string(expected), ", stored shape ",
                             shape_string(ti.shape)));
  }
  return tensor<T, R>(name);
}

template <class T>
std::vector<T> SafetensorsFile::values(const std::string& name) const {
  const TensorInfo& ti = find(name);
  return decode_vector<T>(ti.dtype, bytes_.data() + data_start_ + ti.begin, static_cast<std::size_t>(ti.numel()),
                          where(name));
}

template <class T>
void SafetensorsFile::read_into(const std::string& name, T* out, const std::vector<Index>& expected_shape) const {
  const TensorInfo& ti = find(name);
  if (ti.shape != expected_shape) {
    throw ShapeError(str_cat(where(name), ": expected shape ", shape_string(expected_shape), ", stored shape ",
                             shape_string(ti.shape)));
  }
  decode_elements(ti.dtype, bytes_.data() + data_start_ + ti.begin, static_cast<std::size_t>(ti.numel()), out,
                  where(name));
}

inline void SafetensorsFile::parse() {
  using nlohmann::json;
  const std::uint64_t size = bytes_.size();
  if (size < 8) {
    throw error(str_cat("file is ", size, " bytes, shorter than the 8-byte header length that starts a safetensors file"));
  }
  const std::uint64_t n = detail::load_le<std::uint64_t>(bytes_.data());
  if (n > kMaxHeaderBytes) {
    throw error(str_cat("header length ", n, " (file bytes [0, 8)) exceeds the limit of ", kMaxHeaderBytes, " bytes"));
  }
  if (n > size - 8) {
    throw error(str_cat("header length ", n, " (file bytes [0, 8)) exceeds the ", size - 8,
                        " bytes that follow it: the file is truncated or not safetensors"));
  }
  data_start_ = 8 + n;
  const std::uint64_t data_size = size - data_start_;
  const char* hbegin = reinterpret_cast<const char*>(bytes_.data() + 8);

  // nlohmann keeps the last of repeated keys silently; a checkpoint with two meanings for one name is rejected.
  struct Frame {
    std::set<std::string> keys;
    std::string last_key;
  };
  std::vector<Frame> frames;
  std::string duplicate, duplicate_parent;
  auto on_event = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      frames.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!frames.empty()) frames.pop_back();
    } else if (event == json::parse_event_t::key && !frames.empty()) {
      const std::string k = parsed.get<std::string>();
      if (!frames.back().keys.insert(k).second && duplicate.empty()) {
        duplicate = k;
        duplicate_parent = frames.size() >= 2 ? frames[frames.size() - 2].last_key : std::string();
      }
      frames.back().last_key = k;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(hbegin, hbegin + n, on_event);
  } catch (const json::parse_error& e) {
    throw error(str_cat("the header (file bytes [8, ", 8 + n, ")) is not well-formed JSON, error near file byte ",
                        8 + (e.byte > 0 ? e.byte - 1 : 0), ": ", e.what()));
  }
  if (!header.is_object()) {
    throw error(str_cat("the header (file bytes [8, ", 8 + n, ")) must be a JSON object, got a JSON ",
                        header.type_name()));
  }
  if (hbegin[0] != '{') throw error("the header must begin with '{' (file byte 8); found whitespace");
  if (!duplicate.empty()) {
    throw error(str_cat("duplicate key '", duplicate, "' in the header",
                        duplicate_parent.empty() ? std::string() : str_cat(" (inside '", duplicate_parent, "')")));
  }

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) {
        throw error(str_cat("\"__metadata__\" must be a JSON object mapping strings to strings, got a JSON ",
                            e.type_name()));
      }
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) {
          throw error(str_cat("\"__metadata__\" must map strings to strings, but key '", m.key(), "' has a JSON ",
                              m.value().type_name(), " value"));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string at = str_cat("tensor '", name, "'");
    if (!e.is_object()) throw error(str_cat(at, ": the entry must be a JSON object, got a JSON ", e.type_name()));
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!e.contains(key)) throw error(str_cat(at, ": missing key \"", key, "\""));
    }
    TensorInfo ti;
    ti.name = name;
    const json& jd = e.at("dtype");
    if (!jd.is_string()) throw error(str_cat(at, ": \"dtype\" must be a string, got a JSON ", jd.type_name()));
    const auto dt = dtype_from_string(jd.get<std::string>());
    if (!dt) {
      throw error(str_cat(at, ": unknown dtype \"", jd.get<std::string>(),
                          "\" (known: F64, F32, F16, BF16, I64, I32, U8, BOOL)"));
    }
    ti.dtype = *dt;
    const json& js = e.at("shape");
    if (!js.is_array()) throw error(str_cat(at, ": \"shape\" must be an array, got a JSON ", js.type_name()));
    std::uint64_t count = 1;
    for (std::size_t i = 0; i < js.size(); ++i) {
      const json& v = js[i];
      if (!v.is_number_integer()) {
        throw error(str_cat(at, ": shape[", i, "] must be a non-negative integer, got ", v.dump()));
      }
      if (!v.is_number_unsigned()) {
        throw error(str_cat(at, ": shape[", i, "] = ", v.get<std::int64_t>(), " is negative"));
      }
      const auto d = v.get<std::uint64_t>();
      if (!detail::checked_mul_u64(count, d, static_cast<std::uint64_t>(PTRDIFF_MAX), count)) {
        throw error(str_cat(at, ": shape ", js.dump(), " has more elements than a 64-bit index can count"));
      }
      ti.shape.push_back(static_cast<Index>(d));
    }
    const json& jo = e.at("data_offsets");
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned()) {
      throw error(str_cat(at, ": \"data_offsets\" must be an array of two non-negative integers, got ", jo.dump()));
    }
    ti.begin = jo[0].get<std::uint64_t>();
    ti.end = jo[1].get<std::uint64_t>();
    const std::string offsets = str_cat("data_offsets [", ti.begin, ", ", ti.end, "]");
    if (ti.begin > ti.end) throw error(str_cat(at, ": ", offsets, " have begin > end"));
    if (ti.end > data_size) {
      throw error(str_cat(at, ": ", offsets, " reach past the end of the data block, which has ", data_size,
                          " bytes (file bytes [", data_start_, ", ", size, "))"));
    }
    std::uint64_t need = 0;
    if (!detail::checked_mul_u64(count, dtype_size(ti.dtype), static_cast<std::uint64_t>(PTRDIFF_MAX), need)) {
      throw error(str_cat(at, ": shape ", shape_string(ti.shape), " of ", to_string(ti.dtype),
                          " needs more bytes than a 64-bit offset can address"));
    }
    if (need != ti.end - ti.begin) {
      throw error(str_cat(at, ": shape ", shape_string(ti.shape), " of ", to_string(ti.dtype), " needs ", need,
                          " bytes, but ", offsets, " span ", ti.end - ti.begin));
    }
    tensors_.emplace(name, std::move(ti));
  }

  // Exact cover of the data block, in offset order.
  std::vector<const TensorInfo*> order;
  for (const auto& kv : tensors_) order.push_back(&kv.second);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t cursor = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo* t : order) {
    if (t->begin < cursor) {
      throw error(str_cat("tensor '", t->name, "' (data_offsets [", t->begin, ", ", t->end, "]) overlaps tensor '",
                          previous->name, "' (data_offsets [", previous->begin, ", ", previous->end, "])"));
    }
    if (t->begin > cursor) {
      throw error(str_cat("gap of ", t->begin - cursor, " bytes before tensor '", t->name, "' (data offsets [",
                          cursor, ", ", t->begin, "), file bytes [", data_start_ + cursor, ", ", data_start_ + t->begin,
                          ")): safetensors requires the tensors to cover the data block exactly, without gaps"));
    }
    if (t->end > cursor || previous == nullptr) {
      cursor = t->end;
      previous = t;
    }
  }
  if (cursor != data_size) {
    throw error(str_cat(data_size - cursor, " trailing bytes after the last tensor (file bytes [", data_start_ + cursor,
                        ", ", size, ")): safetensors requires the tensors to cover the data block exactly"));
  }
}

inline SafetensorsWriter::Entry& SafetensorsWriter::insert(const std::string& name, DType dtype,
                                                           const std::vector<Index>& shape) {
  if (name == "__metadata__") {
    throw KeyError("SafetensorsWriter: \"__metadata__\" is reserved by the format and cannot name a tensor");
  }
  if (entries_.count(name)) throw KeyError(str_cat("SafetensorsWriter: tensor '", name, "' was already added"));
  const std::uint64_t n = detail::checked_numel(shape, dtype_size(dtype), str_cat("SafetensorsWriter: '", name, "'"));
  Entry& e = entries_[name];
  e.dtype = dtype;
  e.shape = shape;
  e.bytes.resize(static_cast<std::size_t>(n) * dtype_size(dtype));
  return e;
}

template <class T>
SafetensorsWriter& SafetensorsWriter::add(const std::string& name, const T* data, const std::vector<Index>& shape,
                                          DType as) {
  Entry& e = insert(name, as, shape);
  try {
    encode_elements(data, e.bytes.size() / dtype_size(as), as, e.bytes.data(),
                    str_cat("SafetensorsWriter: '", name, "'"));
  } catch (...) {
    entries_.erase(name);
    throw;
  }
  return *this;
}

inline SafetensorsWriter& SafetensorsWriter::add_raw(const std::string& name, DType dtype,
                                                     const std::vector<Index>& shape, const void* bytes,
                                                     std::size_t nbytes) {
  Entry& e = insert(name, dtype, shape);
  if (nbytes != e.bytes.size()) {
    const std::size_t need = e.bytes.size();
    entries_.erase(name);
    throw ValueError(str_cat("SafetensorsWriter: '", name, "': shape ", shape_string(shape), " of ", to_string(dtype),
                             " needs ", need, " bytes, got ", nbytes));
  }
  if (nbytes > 0) std::memcpy(e.bytes.data(), bytes, nbytes);
  return *this;
}

inline std::vector<std::uint8_t> SafetensorsWriter::to_bytes() const {
  using nlohmann::json;
  json header = json::object();
  std::uint64_t offset = 0;
  for (const auto& kv : entries_) {  // std::map: sorted by name, the same order nlohmann prints the keys in
    const Entry& e = kv.second;
    json shape = json::array();
    for (Index d : e.shape) shape.push_back(static_cast<std::uint64_t>(d));
    header[kv.first] = {{"dtype", to_string(e.dtype)},
                        {"shape", shape},
                        {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  if (!metadata_.empty()) {
    json meta = json::object();
    for (const auto& kv : metadata_) meta[kv.first] = kv.second;
    header["__metadata__"] = meta;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::type_error& e) {
    throw ValueError(str_cat("SafetensorsWriter: a tensor name or metadata string is not valid UTF-8: ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<std::uint8_t> out(8 + text.size() + offset);
  detail::store_le(out.data(), static_cast<std::uint64_t>(text.size()));
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::uint8_t* p = out.data() + 8 + text.size();
  for (const auto& kv : entries_) {
    if (!kv.second.bytes.empty()) std::memcpy(p, kv.second.bytes.data(), kv.second.bytes.size());
    p += kv.second.bytes.size();
  }
  return out;
}

}  // namespace io
}  // namespace sma
