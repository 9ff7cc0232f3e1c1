// tests/cuda/emulation/emulate_main.cpp: one CTest executable for the host emulations of CUDA kernels (cuda_runtime.h
// beside this file: one CTA = 256 threads, __syncthreads a barrier), so that CI, which has no GPU, still checks the
// kernels' indexing, tiling and barrier placement against the CPU ops on every change. Each emulate_*.cpp keeps its
// own main for use by hand (the command in its header); here it is compiled with main renamed (tests/CMakeLists.txt).
// emulate_stream.cpp is left out: it takes minutes on two cores.
#include <cstdio>

int emulate_attention_main(int argc, char** argv);
int emulate_padded_main();
int emulate_optim_main();
int emulate_argmax_main();

int main(int, char** argv) {
  char* no_args[] = {argv[0], nullptr};
  struct Run {
    const char* name;
    int rc;
  };
  const Run runs[] = {{"attention", emulate_attention_main(1, no_args)},
                      {"padded operands", emulate_padded_main()},
                      {"optimisers", emulate_optim_main()},
                      {"argmax", emulate_argmax_main()}};
  int failed = 0;
  for (const Run& r : runs) {
    std::printf("emulation %-16s %s\n", r.name, r.rc == 0 ? "ok" : "FAILED");
    failed += r.rc != 0;
  }
  return failed == 0 ? 0 : 1;
}
