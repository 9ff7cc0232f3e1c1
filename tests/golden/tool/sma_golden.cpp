// sma-golden: checks the library against golden cases computed with the official PyTorch implementation.
//
//   sma-golden [--float32] [--verbose] CASE.safetensors...
//
// For each case it builds the module from the file's metadata and weights, runs forward and backward, compares every
// stored output, gradient and intermediate, and prints one line: "PASS name max_rel_err=..." or
// "FAIL name tensor=... err=...". Exits 1 if any case fails, 2 on bad usage.
#include "../golden_case.hpp"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  CLI::App app{"Compare sma with golden cases from the official SeqBoat implementation"};
  std::vector<std::string> files;
  bool float32 = false, verbose = false;
  app.add_flag("--float32", float32, "run in float32 (tolerance 1e-4 relative to each tensor's largest magnitude)");
  app.add_flag("-v,--verbose", verbose, "print every compared tensor and its error");
  app.add_option("cases", files, "golden case files (.safetensors)")->required()->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);

  sma::golden::RunOptions opt;
  if (float32) {
    opt.tolerance = 1e-4;
    opt.zero_tolerance = 1e-5;
  }
  int failed = 0;
  for (const auto& f : files) {
    const auto r = float32 ? sma::golden::run_case<float>(f, opt) : sma::golden::run_case<double>(f, opt);
    if (r.ok)
      std::printf("PASS %s max_rel_err=%.3g\n", r.name.c_str(), r.max_rel_err);
    else
      std::printf("FAIL %s %s\n", r.name.c_str(), r.failure.c_str());
    if (verbose)
      for (const auto& c : r.comparisons)
        std::printf("    %-50s %s err=%.3g%s\n", c.tensor.c_str(), c.ok ? "ok  " : "FAIL", c.error,
                    c.zero_reference ? " (abs, reference 0)" : "");
    failed += r.ok ? 0 : 1;
  }
  std::printf("%zu cases, %d failed\n", files.size(), failed);
  return failed ? 1 : 0;
}
