// sma/io/atomic_file.hpp: whole-file reads, and writes that either fully replace a file or leave it untouched.
#pragma once

#include <sma/core/error.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#if defined(_WIN32)
#include <process.h>
#else
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace sma {
namespace io {

/// Options of write_file_atomic.
struct AtomicWriteOptions {
  /// Flush the file to stable storage (fsync) before the rename, and the folder after it. Turn off only for
  /// scratch files where a power cut may lose the new content (the old file is still never half-overwritten).
  bool sync = true;
  /// TESTING HOOK: when >= 0, the write fails with IoError once this many bytes have reached the temporary file,
  /// as a full disk would. Lets tests check that a failed save leaves the old file and no temporary file behind.
  std::int64_t fail_after_bytes = -1;
};

/// The temporary name a write to `path` goes through: `path + ".tmp.<pid>"`, in the same folder so that the final
/// rename stays on one file system (and so is atomic).
inline std::string temp_path_for(const std::string& path);

/// Replaces the file at `path` with `size` bytes from `data`, atomically:
///   writes `temp_path_for(path)`, flushes and fsyncs it, then renames it over `path` (POSIX rename is atomic, so a
///   reader sees the old file or the new one, never a mix; a crash leaves at worst a stray temporary file).
/// On any failure the temporary file is removed, `path` is left as it was, and IoError says which step failed, on
/// which file, and why (the system's message).
/// Two saves to the same path from one process at the same time share the temporary name: serialise them.
/// On Windows the rename is a remove + rename and so not atomic.
inline void write_file_atomic(const std::string& path, const void* data, std::size_t size,
                              const AtomicWriteOptions& options = {});
inline void write_file_atomic(const std::string& path, const std::vector<std::uint8_t>& bytes,
                              const AtomicWriteOptions& options = {}) {
  write_file_atomic(path, bytes.data(), bytes.size(), options);
}

/// The whole content of the file at `path`. Throws IoError (with the system's reason) if it cannot be read.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& path);

// ---- implementation ----

namespace detail {

inline std::string errno_message(int err) { return std::generic_category().message(err); }

inline long process_id() {
#if defined(_WIN32)
  return static_cast<long>(_getpid());
#else
  return static_cast<long>(::getpid());
#endif
}

inline std::string parent_folder(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace detail

inline std::string temp_path_for(const std::string& path) {
  return str_cat(path, ".tmp.", detail::process_id());
}

#if !defined(_WIN32)

inline void write_file_atomic(const std::string& path, const void* data, std::size_t size,
                              const AtomicWriteOptions& options) {
  const std::string tmp = temp_path_for(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    throw IoError(str_cat(path, ": cannot create the temporary file ", tmp, ": ", detail::errno_message(err)));
  }
  // Any failure below: close, remove the temporary file, report. The target has not been touched yet.
  auto fail = [&](const std::string& what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw IoError(str_cat(path, ": ", what, err != 0 ? str_cat(": ", detail::errno_message(err)) : std::string(),
                          " (the existing file, if any, is unchanged)"));
  };
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::size_t written = 0;
  constexpr std::size_t kChunk = std::size_t{1} << 20;
  while (written < size) {
    std::size_t n = std::min(kChunk, size - written);
    if (options.fail_after_bytes >= 0) {
      const auto budget = static_cast<std::uint64_t>(options.fail_after_bytes);
      if (written >= budget) {
        fail(str_cat("write to ", tmp, " failed after ", written, " of ", size,
                     " bytes (simulated by AtomicWriteOptions::fail_after_bytes)"),
             0);
      }
      n = static_cast<std::size_t>(std::min<std::uint64_t>(n, budget - written));
    }
    const ::ssize_t k = ::write(fd, p + written, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      fail(str_cat("write to ", tmp, " failed after ", written, " of ", size, " bytes"), errno);
    }
    written += static_cast<std::size_t>(k);
  }
  if (options.fail_after_bytes >= 0 && static_cast<std::uint64_t>(options.fail_after_bytes) < size) {
    fail(str_cat("write to ", tmp, " failed after ", written, " of ", size,
                 " bytes (simulated by AtomicWriteOptions::fail_after_bytes)"),
         0);
  }
  if (options.sync && ::fsync(fd) != 0) fail(str_cat("fsync of ", tmp, " failed"), errno);
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) fail(str_cat("close of ", tmp, " failed"), errno);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(str_cat("cannot rename ", tmp, " over ", path), errno);
  if (options.sync) {
    // Makes the rename itself durable; best effort (some file systems refuse to fsync a folder).
    const int dfd = ::open(detail::parent_folder(path).c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }
}

#else

inline void write_file_atomic(const std::string& path, const void* data, std::size_t size,
                              const AtomicWriteOptions& options) {
  const std::string tmp = temp_path_for(path);
  auto fail = [&](const std::string& what) {
    std::remove(tmp.c_str());
    throw IoError(str_cat(path, ": ", what, " (the existing file, if any, is unchanged)"));
  };
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(str_cat("cannot create the temporary file ", tmp));
    std::size_t n = size;
    if (options.fail_after_bytes >= 0 && static_cast<std::uint64_t>(options.fail_after_bytes) < size) {
      n = static_cast<std::size_t>(options.fail_after_bytes);
    }
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    out.flush();
    if (!out) fail(str_cat("write to ", tmp, " failed"));
    if (n < size) {
      out.close();
      fail(str_cat("write to ", tmp, " failed after ", n, " of ", size,
                   " bytes (simulated by AtomicWriteOptions::fail_after_bytes)"));
    }
  }
  std::remove(path.c_str());
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(str_cat("cannot rename ", tmp, " over ", path));
}

#endif

inline std::vector<std::uint8_t> read_file_bytes(const std::string& path) {
#if !defined(_WIN32)
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw IoError(str_cat(path, ": cannot open for reading: ", detail::errno_message(err)));
  }
  struct ::stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(str_cat(path, ": not a regular file"));
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < bytes.size()) {
    const ::ssize_t k = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      const int err = k < 0 ? errno : 0;
      ::close(fd);
      throw IoError(str_cat(path, ": read failed after ", got, " of ", bytes.size(), " bytes",
                            err != 0 ? str_cat(": ", detail::errno_message(err)) : std::string(" (file shrank?)")));
    }
    got += static_cast<std::size_t>(k);
  }
  ::close(fd);
  return bytes;
#else
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw IoError(str_cat(path, ": cannot open for reading"));
  const std::streamoff end = in.tellg();
  if (end < 0) throw IoError(str_cat(path, ": cannot determine the file size"));
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(end));
  in.seekg(0);
  if (!bytes.empty() && !in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()))) {
    throw IoError(str_cat(path, ": read failed after ", in.gcount(), " of ", bytes.size(), " bytes"));
  }
  return bytes;
#endif
}

}  // namespace io
}  // namespace sma
