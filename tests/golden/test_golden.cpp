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

TEST_CASE("a case file missing a weight or an output fails with a message naming it", "[golden][errors]") {
  const fs::path src = golden_dir() / "layer_causal_relu2.safetensors";
  if (!fs::exists(src)) {
    WARN("golden case " << src << " not found");
    return;
  }
  const sma::io::SafetensorsFile f(src.string());
  auto without = [&](const std::string& dropped) {
    sma::io::SafetensorsWriter w;
    for (const auto& name : f.names()) {
      if (name == dropped) continue;
      const auto& info = f.info(name);
      const auto raw = f.raw(name);
      w.add_raw(name, info.dtype, info.shape, raw.data, raw.size);
    }
    for (const auto& kv : f.metadata()) w.set_metadata(kv.first, kv.second);
    const fs::path out = fs::temp_directory_path() / ("sma_golden_without_" + dropped + ".safetensors");
    w.save(out.string());
    return out.string();
  };
  const auto no_weight = sma::golden::run_case<double>(without("mx_proj.weight"));
  CHECK_FALSE(no_weight.ok);
  CHECK_THAT(no_weight.failure, Catch::Matchers::Contains("'mx_proj.weight' is missing"));
  const auto extra_param = sma::golden::run_case<double>(without("grad_output"));
  CHECK_FALSE(extra_param.ok);
  CHECK_THAT(extra_param.failure, Catch::Matchers::Contains("grad_output"));
}
