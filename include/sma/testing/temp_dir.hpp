// sma/testing/temp_dir.hpp: a scratch folder for tests and examples that write files.
#pragma once

#include <sma/core/error.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>

namespace sma::testing {

/// A new, empty folder under the system temporary folder, removed with everything in it when the object goes.
/// The name is `<prefix>_<random hex>`; create_directory only succeeds for a folder it made, so two processes
/// never share one. Throws IoError when no folder can be made (unwritable temporary folder).
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "sma_test") {
    namespace fs = std::filesystem;
    std::random_device rd;
    std::mt19937_64 rng((std::uint64_t(rd()) << 32) ^ rd());
    const fs::path base = fs::temp_directory_path();
    for (int attempt = 0; attempt < 64; ++attempt) {
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(rng()));
      const fs::path p = base / (prefix + "_" + hex);
      std::error_code ec;
      if (fs::create_directory(p, ec)) {
        path_ = p;
        return;
      }
      if (ec) throw IoError(str_cat("TempDir: cannot create '", p.string(), "': ", ec.message()));
    }
    throw IoError(str_cat("TempDir: no free name for '", prefix, "_*' under '", base.string(), "'"));
  }
  ~TempDir() {
    namespace fs = std::filesystem;
    std::error_code ec;
    // A test may have made the folder read-only (failed-save tests); give the owner access back first.
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  /// The path of `name` inside the folder.
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace sma::testing
