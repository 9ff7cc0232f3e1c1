// sma-golden: checks the library against golden cases computed with the official PyTorch implementation.
//
//   sma-golden [--float32] [--verbose] [--stream] [--device cpu|cuda] CASE.safetensors...
//
// For each case it builds the module from the file's metadata and weights, runs forward and backward, compares every
// stored output, gradient and intermediate, and prints one line: "PASS name max_rel_err=..." or
// "FAIL name tensor=... err=...". Exits 1 if any case fails, 2 on bad usage.
// With --stream, causal cases are instead run token by token through the streaming API and every position's output
// (and router decision) is compared with the stored full-sequence results, same tolerances; bidirectional cases
// print "SKIP name (bidirectional)".
// With --device cuda, ema and layer cases run through the CUDA backend in float32 (golden_cuda.hpp; other kinds and
// batchnorm layers SKIP); a build without the backend, or a machine without a GPU, says so and exits 2.
#include "../golden_case.hpp"
#ifdef SMA_WITH_CUDA
#include "golden_cuda.hpp"
#endif

namespace {
// Never reached without the backend: main returns before the loop when --device cuda was asked for.
sma::golden::CaseResult run_on_device(const std::string& f, const sma::golden::RunOptions& opt) {
#ifdef SMA_WITH_CUDA
  return sma::golden::run_case_cuda(f, opt);
#else
  (void)opt;
  sma::golden::CaseResult r;
  r.name = f;
  r.ok = false;
  r.failure = "no CUDA backend in this build";
  return r;
#endif
}
}  // namespace

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
  std::string device = "cpu";
  app.add_option("--device", device, "cpu (default) or cuda: run ema and layer cases on the GPU in float32")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("cases", files, "golden case files (.safetensors)")->required()->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);

  const bool on_cuda = device == "cuda";
  if (on_cuda) {
#ifdef SMA_WITH_CUDA
    if (stream) {
      std::fprintf(stderr, "sma-golden: --stream and --device cuda cannot be combined\n");
      return 2;
    }
    if (sma::cuda::device_count() == 0) {
      std::fprintf(stderr, "sma-golden: --device cuda: no CUDA device is visible\n");
      return 2;
    }
    std::printf("device: %s\n", sma::cuda::device_description().c_str());
    float32 = true;  // the device path is float32
#else
    std::fprintf(stderr,
                 "sma-golden: --device cuda: this build has no CUDA backend (configure with -DSMA_ENABLE_CUDA=ON on a "
                 "machine with the CUDA toolkit)\n");
    return 2;
#endif
  }
  sma::golden::RunOptions opt;
  if (float32) {
    opt.tolerance = 1e-4;
    opt.zero_tolerance = 1e-5;
  }
  int failed = 0, skipped = 0;
  for (const auto& f : files) {
    const auto r = on_cuda ? run_on_device(f, opt)
                 : stream  ? (float32 ? sma::golden::run_case_stream<float>(f, opt)
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
