// sma-golden: checks the library against golden cases computed with the official PyTorch implementation.
//
//   sma-golden [--float32] [--verbose] [--stream] CASE.safetensors...
//
// For each case it builds the module from the file's metadata and weights, runs forward and backward, compares every
// stored output, gradient and intermediate, and prints one line: "PASS name max_rel_err=..." or
// "FAIL name tensor=... err=...". Exits 1 if any case fails, 2 on bad usage.
// With --stream, causal cases are instead run token by token through the streaming API and every position's output
// (and router decision) is compared with the stored full-sequence results, same tolerances; bidirectional cases
// print "SKIP name (bidirectional)".
#include "../golden_case.hpp"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  CLI::App app{"Compare sma with golden cases from the official SeqBoat implementation"};
  std::vector<std::string> files;
  bool float32 = false, verbose = false, stream = false;
  app.add_flag("--float32", float32, "run in float32 (tolerance 1e-4 relative to each tensor's largest magnitude)");
  app.add_flag("-v,--verbose", verbose, "print every compared tensor and its error");
  app.add_flag("--stream", stream,
               "causal cases: run token by token (streaming state) and compare every position with the stored output");
  app.add_option("cases", files, "golden case files (.safetensors)")->required()->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);

  sma::golden::RunOptions opt;
  if (float32) {
    opt.tolerance = 1e-4;
    opt.zero_tolerance = 1e-5;
  }
  int failed = 0, skipped = 0;
  for (const auto& f : files) {
    const auto r = stream ? (float32 ? sma::golden::run_case_stream<float>(f, opt)
                                     : sma::golden::run_case_stream<double>(f, opt))
                          : (float32 ? sma::golden::run_case<float>(f, opt) : sma::golden::run_case<double>(f, opt));
    if (r.skipped) {
      std::printf("SKIP %s (%s)\n", r.name.c_str(), r.note.c_str());
      ++skipped;
      continue;
    }
    if (r.ok)
      std::printf("PASS %s max_rel_err=%.3g%s%s\n", r.name.c_str(), r.max_rel_err, r.note.empty() ? "" : " note: ",
                  r.note.c_str());
    else
      std::printf("FAIL %s %s\n", r.name.c_str(), r.failure.c_str());
    if (verbose)
      for (const auto& c : r.comparisons)
        std::printf("    %-50s %s err=%.3g%s\n", c.tensor.c_str(), c.ok ? "ok  " : "FAIL", c.error,
                    c.zero_reference ? " (abs, reference 0)" : "");
    failed += r.ok ? 0 : 1;
  }
  if (skipped)
    std::printf("%zu cases, %d failed, %d skipped\n", files.size(), failed, skipped);
  else
    std::printf("%zu cases, %d failed\n", files.size(), failed);
  return failed ? 1 : 0;
}
