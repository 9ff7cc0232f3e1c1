// sma/cuda/bounded_gemm.hpp: cuBLAS products over an upper bound of rows whose true row count S lives on the
// device, costing about ceil(S / chunk) chunks of work instead of all of them, with no host wait (issue #7: S is
// known only on the device after compression). Definitions in cuda/common/bounded_gemm.cu. Host header: no CUDA
// header, the stream is an opaque `void*` (a cudaStream_t).
//
// WHAT
//   Each BoundedGemm is a row-major, optionally strided-batched product C[t] = alpha op(A[t]) op(B[t]) + beta C[t]
//   (t < batch; A, B bf16 or fp32, C fp32 or bf16 (c_type), fp32 accumulation; op = transpose when trans_a /
//   trans_b). One of its
//   dimensions is split into chunks of `chunk` units and a chunk runs only when its first row is below *count:
//     bound = rows       rows of C (m); chunk c covers rows [c*chunk, (c+1)*chunk): a projection on B*L rows.
//     bound = reduction  the reduction dimension (k), e.g. dW += A^T B over the token rows; the chunks run one
//                        after the other (beta for the first, 1 after it). The first chunk always runs, so beta is
//                        applied also when S = 0.
//     bound = batch      batch entries; entry t counts as rows_per_entry rows (per-block band products).
//   A chunk starts at row first_row + c * chunk * (rows_per_entry for batch, else 1) in the units of *count.
// CONTRACT
//   rows: rows [0, S) of C equal the full product; rows of the chunks that run are written (from whatever the rows
//   past S of op(A) hold), the rows of skipped chunks are not touched. batch: the same per entry.
//   reduction: the rows [S, end of the last running chunk) of the k-dimension operands are summed in: they must be
//   zero (as the layer's zero-filled buffers past S are) for the result to be the product over the first S rows.
//   The products of one call may run concurrently: their C must not overlap. Nothing waits for the host.
// HOW (docs/cuda.md, "Products that follow the device's S")
//   A CUDA graph: a one-thread kernel reads *count and sets one conditional handle per chunk, then one IF node per
//   chunk whose body is that chunk's cuBLAS call (captured once). The instantiated graph is cached per host thread
//   and device, keyed by every field (pointers included) and `count`; later calls only cudaGraphLaunch it on
//   `stream`. A new pointer or shape builds (captures and instantiates) a new graph, which costs about a
//   millisecond of host time: keep buffers stable across steps. At most kBoundedGemmCacheEntries graphs are kept
//   (the least recently used one is freed, after a device synchronisation). Each graph owns cuBLAS workspace: 1 MiB
//   per chunk of rows/batch products, 8 MiB per reduction product.
// USAGE (the layer's projection on M_max = B*L rows, S = offsets[B] on the device):
//   BoundedGemm g;  g.type = GemmType::bf16;  g.trans_b = true;  g.m = M_max;  g.n = P;  g.k = D;
//   g.a = x16;  g.lda = D;  g.b = w16;  g.ldb = D;  g.c = y;  g.ldc = P;          // y = x W^T
//   bounded_gemm(g, offsets + B, stream);
// ERRORS: ValueError for a bad description (negative sizes, short leading dimensions, null pointers, more than
//   kBoundedGemmMaxChunks chunks in one call); CudaError naming the failing CUDA or cuBLAS call.
#pragma once

namespace sma::cuda {

enum class GemmType : int { bf16, fp32 };        ///< element type of A and B, and of C (c_type)
enum class GemmBound : int { rows, reduction, batch };

struct BoundedGemm {
  GemmType type = GemmType::bf16;
  bool trans_a = false, trans_b = false;  ///< row-major op(A) (m x k), op(B) (k x n)
  int m = 0, n = 0, k = 0;                ///< full (upper-bound) sizes
  float alpha = 1.f, beta = 0.f;
  const void* a = nullptr;
  int lda = 0;
  long long stride_a = 0;  ///< elements between batch entries
  const void* b = nullptr;
  int ldb = 0;
  long long stride_b = 0;
  void* c = nullptr;                       ///< fp32, or bf16 with c_type = bf16 (fp32 accumulation either way)
  GemmType c_type = GemmType::fp32;
  int ldc = 0;
  long long stride_c = 0;
  int batch = 1;
  GemmBound bound = GemmBound::rows;
  int chunk = 0;            ///< rows (rows, reduction) or entries (batch) per chunk; 0: bounded_gemm_default_chunk
  int rows_per_entry = 1;   ///< batch: rows of *count per batch entry
  long long first_row = 0;  ///< rows of *count before the first row (entry) of this product
};

/// The common part of a description: a bf16 product C = op(A) op(B) (alpha 1, beta 0, fp32 C, bound = rows,
/// batch 1); callers set the other fields (alpha, beta, c_type, strides and batch, bound, chunk) after.
inline BoundedGemm bf16_product(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda,
                                const void* b, int ldb, void* c, int ldc) {
  BoundedGemm g;
  g.type = GemmType::bf16;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.lda = lda;
  g.b = b;
  g.ldb = ldb;
  g.c = c;
  g.ldc = ldc;
  return g;
}

constexpr int kBoundedGemmMaxChunks = 64;     ///< chunks of all products of one call together
/// Instantiated graphs kept per host thread: a model's layers each hold a few (their buffers differ), and evicting
/// one waits for the device, so the cache is sized for dozens of layers.
constexpr int kBoundedGemmCacheEntries = 256;

/// The chunk used when BoundedGemm::chunk is 0: `units` (rows, or entries for batch) split in 8, rows rounded up
/// to a multiple of 64 (tile friendly), never fewer than 64 rows or 1 entry. 8 rather than 16: every chunk node
/// costs a few microseconds even when the product is large (docs/benchmarks.md, "Products bounded by S").
int bounded_gemm_default_chunk(const BoundedGemm& g);

/// Runs products[0..n) (see WHAT) with S = *count (a device int) on `stream`.
void bounded_gemm(const BoundedGemm* products, int n, const int* count, void* stream);
inline void bounded_gemm(const BoundedGemm& g, const int* count, void* stream) { bounded_gemm(&g, 1, count, stream); }

/// graph: as described. full: every product on its whole upper bound through plain cuBLAS calls on `stream` (the
/// reference the graph path is measured against). Process-wide; initially `full` when the environment variable
/// SMA_CUDA_BOUNDED_GEMM is "full" (or "0"), else `graph`. While `stream` is being captured into a graph (the
/// models' set_step_graph) every call runs as in full mode: a graph cannot be launched into a capturing stream.
enum class BoundedGemmMode : int { graph, full };
void set_bounded_gemm_mode(BoundedGemmMode mode);
BoundedGemmMode bounded_gemm_mode();

/// In graph mode, a product whose whole upper bound costs less than this many GFLOP (bf16-equivalent: an fp32
/// product counts 16x) runs as one plain cuBLAS call, not in chunks: each chunk node costs a few microseconds
/// whatever its size, so chunking a small product costs more than the rows past S save. Default 16 (on an H200 the
/// CIFAR training step took 17.7 ms with it against 20.2 ms with every product chunked; docs/benchmarks.md);
/// the environment variable SMA_CUDA_BOUNDED_MIN_GFLOP sets the initial value; 0 chunks every product.
void set_bounded_gemm_min_gflop(double gflop);
double bounded_gemm_min_gflop();

/// Counters of this host thread: graphs built (captured and instantiated), graph launches, graphs cached now, and
/// chunks whose cuBLAS call had to be captured into a child graph (a direct capture into the IF node's body failed).
struct BoundedGemmStats {
  long long builds = 0, launches = 0, cached = 0, child_graphs = 0;
};
BoundedGemmStats bounded_gemm_stats();
/// Frees this thread's cached graphs and their workspace (synchronises the device first).
void clear_bounded_gemm_cache();

}  // namespace sma::cuda
