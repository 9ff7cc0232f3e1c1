// sma::cuda::bounded_gemm (include/sma/cuda/bounded_gemm.hpp): cuBLAS products whose cost follows a row count that
// only the device knows.
//
// WHY a graph of conditional nodes: cuBLAS takes its sizes from the host, and reading S back would stall the
// stream (issue #7 forbids it). A conditional IF node decides on the device whether its body runs, so each chunk
// of a product becomes the body of one IF node, captured once from cuBLAS; a one-thread kernel at the head of the
// graph sets the conditions from S. Skipped chunks cost only their node's bookkeeping.
#include <sma/cuda/bounded_gemm.hpp>

#include "bounded_gemm.cuh"

#include <sma/core/error.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace sma::cuda {

namespace {

constexpr std::size_t kRowsWorkspace = std::size_t(1) << 20;     // per chunk of a rows / batch product
constexpr std::size_t kReduceWorkspace = std::size_t(8) << 20;   // per reduction product (its chunks run in turn)

/// One cuBLAS call: a chunk of a product, or the whole product in full mode. Pointers already offset.
struct Call {
  GemmType type;
  bool ta, tb;
  int m, n, k;
  float alpha, beta;
  const void* a;
  int lda;
  long long sa;
  const void* b;
  int ldb;
  long long sb;
  void* c;
  GemmType ct;
  int ldc;
  long long sc;
  int batch;
};

struct Piece {
  Call call;
  long long start;  // first row in the units of *count; LLONG_MIN: always runs
  int product;      // index of its product in the call
  bool chained;     // runs after the previous piece of the same product (reduction)
};

void run_call(cublasHandle_t h, const Call& c) {
  const cudaDataType_t t = c.type == GemmType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType_t tc = c.ct == GemmType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasOperation_t opa = c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = c.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  // cuBLAS is column-major: the row-major C = op(A) op(B) is C^T = op(B)^T op(A)^T, operands swapped.
  if (c.batch == 1) {
    SMA_CUDA_CHECK(cublasGemmEx(h, opb, opa, c.n, c.m, c.k, &c.alpha, c.b, t, c.ldb, c.a, t, c.lda, &c.beta, c.c,
                                tc, c.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else {
    SMA_CUDA_CHECK(cublasGemmStridedBatchedEx(h, opb, opa, c.n, c.m, c.k, &c.alpha, c.b, t, c.ldb, c.sb, c.a, t,
                                              c.lda, c.sa, &c.beta, c.c, tc, c.ldc, c.sc, c.batch,
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

const char* bound_name(GemmBound b) {
  switch (b) {
    case GemmBound::rows: return "rows";
    case GemmBound::reduction: return "reduction";
    default: return "batch";
  }
}

void validate(const BoundedGemm& g, int i) {
  const std::string where = str_cat("cuda::bounded_gemm: product ", i, " (bound ", bound_name(g.bound), ")");
  if (g.type != GemmType::bf16 && g.type != GemmType::fp32) throw ValueError(str_cat(where, ": unknown type"));
  if (g.c_type != GemmType::bf16 && g.c_type != GemmType::fp32) throw ValueError(str_cat(where, ": unknown c_type"));
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0)
    throw ValueError(str_cat(where, ": negative size (m ", g.m, ", n ", g.n, ", k ", g.k, ", batch ", g.batch, ")"));
  if (g.chunk < 0) throw ValueError(str_cat(where, ": chunk ", g.chunk, " < 0"));
  if (g.rows_per_entry < 1) throw ValueError(str_cat(where, ": rows_per_entry ", g.rows_per_entry, " < 1"));
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  const int a_cols = g.trans_a ? g.m : g.k, b_cols = g.trans_b ? g.k : g.n;
  if (g.lda < std::max(1, a_cols) || g.ldb < std::max(1, b_cols) || g.ldc < std::max(1, g.n))
    throw ValueError(str_cat(where, ": leading dimension too small (lda ", g.lda, " for ", a_cols, " columns, ldb ",
                             g.ldb, " for ", b_cols, ", ldc ", g.ldc, " for ", g.n, ")"));
  if (!g.c || (g.k > 0 && (!g.a || !g.b))) throw ValueError(str_cat(where, ": a, b or c is nullptr"));
  if (g.batch > 1 && (g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0))
    throw ValueError(str_cat(where, ": negative batch stride"));
}

long long units_of(const BoundedGemm& g) {
  switch (g.bound) {
    case GemmBound::rows: return g.m;
    case GemmBound::reduction: return g.k;
    default: return g.batch;
  }
}

bool empty(const BoundedGemm& g) { return g.m == 0 || g.n == 0 || g.batch == 0 || (g.k == 0 && g.beta == 1.f); }

Call whole(const BoundedGemm& g) {
  return Call{g.type, g.trans_a, g.trans_b, g.m,   g.n,   g.k,   g.alpha,   g.beta,
              g.a,    g.lda,     g.stride_a, g.b,  g.ldb, g.stride_b, g.c, g.c_type, g.ldc, g.stride_c, g.batch};
}

const void* advance(const void* p, long long elements, GemmType t) {
  return static_cast<const char*>(p) + elements * (t == GemmType::bf16 ? 2 : 4);
}
void* advance(void* p, long long elements, GemmType t) {
  return static_cast<char*>(p) + elements * (t == GemmType::bf16 ? 2 : 4);
}

/// The chunks of product g (index i) appended to `out`.
void split(const BoundedGemm& g, int i, std::vector<Piece>& out) {
  const long long units = units_of(g);
  const long long chunk = g.chunk > 0 ? g.chunk : bounded_gemm_default_chunk(g);
  const long long per = g.bound == GemmBound::batch ? g.rows_per_entry : 1;
  if (g.bound == GemmBound::reduction && units == 0) {  // k = 0: only beta C, applied once
    out.push_back(Piece{whole(g), LLONG_MIN, i, false});
    return;
  }
  for (long long lo = 0, c = 0; lo < units; lo += chunk, ++c) {
    const long long len = std::min(chunk, units - lo);
    Call x = whole(g);
    switch (g.bound) {
      case GemmBound::rows:
        x.m = static_cast<int>(len);
        x.a = advance(g.a, g.trans_a ? lo : lo * g.lda, g.type);
        x.c = advance(g.c, lo * g.ldc, g.c_type);
        break;
      case GemmBound::reduction:
        x.k = static_cast<int>(len);
        x.a = advance(g.a, g.trans_a ? lo * g.lda : lo, g.type);
        x.b = advance(g.b, g.trans_b ? lo : lo * g.ldb, g.type);
        if (c > 0) x.beta = 1.f;
        break;
      case GemmBound::batch:
        x.batch = static_cast<int>(len);
        x.a = advance(g.a, lo * g.stride_a, g.type);
        x.b = advance(g.b, lo * g.stride_b, g.type);
        x.c = advance(g.c, lo * g.stride_c, g.c_type);
        break;
    }
    const bool always = g.bound == GemmBound::reduction && c == 0;
    out.push_back(Piece{x, always ? LLONG_MIN : g.first_row + lo * per, i, g.bound == GemmBound::reduction});
  }
}

struct ConditionArgs {
  const int* count;
  int n;
  cudaGraphConditionalHandle handle[kBoundedGemmMaxChunks];
  long long start[kBoundedGemmMaxChunks];
};

// One thread: the handles must not be set concurrently.
__global__ void set_conditions_kernel(const ConditionArgs a) {
  const long long S = *a.count;
  for (int i = 0; i < a.n; ++i) cudaGraphSetConditional(a.handle[i], a.start[i] < S ? 1u : 0u);
}

/// The cuBLAS handle and the capture stream of this thread on one device, created on first use.
struct DeviceTools {
  cublasHandle_t blas = nullptr;
  cudaStream_t capture = nullptr;
};

struct ThreadTools {
  std::vector<DeviceTools> dev;
  ~ThreadTools() {
    for (DeviceTools& d : dev) {
      if (d.blas) cublasDestroy(d.blas);
      if (d.capture) cudaStreamDestroy(d.capture);
    }
  }
};

DeviceTools& tools() {
  thread_local ThreadTools t;
  int dev = 0;
  SMA_CUDA_CHECK(cudaGetDevice(&dev));
  if (static_cast<int>(t.dev.size()) <= dev) t.dev.resize(static_cast<std::size_t>(dev) + 1);
  DeviceTools& d = t.dev[static_cast<std::size_t>(dev)];
  if (!d.blas) SMA_CUDA_CHECK(cublasCreate(&d.blas));
  if (!d.capture) SMA_CUDA_CHECK(cudaStreamCreateWithFlags(&d.capture, cudaStreamNonBlocking));
  return d;
}

struct Entry {
  cudaGraphExec_t exec = nullptr;
  void* workspace = nullptr;
  long long last_use = 0;
};

void release(Entry& e) noexcept {
  if (e.exec) cudaGraphExecDestroy(e.exec);
  if (e.workspace) cudaFree(e.workspace);
  e.exec = nullptr;
  e.workspace = nullptr;
}

struct Cache {
  std::map<std::vector<long long>, Entry> entries;
  long long tick = 0;
  BoundedGemmStats stats;
  ~Cache() {
    for (auto& kv : entries) release(kv.second);
  }
};

Cache& cache() {
  thread_local Cache c;
  return c;
}

long long bits(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
long long addr(const void* p) { return static_cast<long long>(reinterpret_cast<std::uintptr_t>(p)); }

std::vector<long long> key_of(const BoundedGemm* g, int n, const int* count, int device) {
  std::vector<long long> k{device, addr(count), n};
  for (int i = 0; i < n; ++i) {
    const BoundedGemm& x = g[i];
    const long long chunk = x.chunk > 0 ? x.chunk : bounded_gemm_default_chunk(x);
    k.insert(k.end(), {static_cast<long long>(x.type), x.trans_a, x.trans_b, x.m, x.n, x.k, bits(x.alpha),
                       bits(x.beta), addr(x.a), x.lda, x.stride_a, addr(x.b), x.ldb, x.stride_b, addr(x.c),
                       static_cast<long long>(x.c_type), x.ldc,
                       x.stride_c, x.batch, static_cast<long long>(x.bound), chunk, x.rows_per_entry, x.first_row});
  }
  return k;
}

/// Owns a cudaGraph_t for the duration of a build.
struct GraphGuard {
  cudaGraph_t g = nullptr;
  ~GraphGuard() {
    if (g) cudaGraphDestroy(g);
  }
};

/// Captures the cuBLAS call of one chunk into `body` (an IF node's body graph) on the capture stream. First
/// straight into the body (cudaStreamBeginCaptureToGraph); should that capture fail, into a graph of its own that
/// becomes a child-graph node of the body. Returns whether the second way was taken.
bool capture_into(cudaGraph_t body, const DeviceTools& t, const Call& c, void* workspace, std::size_t ws_bytes) {
  const auto prepare = [&] {
    SMA_CUDA_CHECK(cublasSetStream(t.blas, t.capture));  // resets the workspace, hence set after it
    SMA_CUDA_CHECK(cublasSetWorkspace(t.blas, workspace, ws_bytes));
  };
  const auto abandon = [&] {
    cudaGraph_t discard = nullptr;
    cudaStreamEndCapture(t.capture, &discard);
    if (discard && discard != body) cudaGraphDestroy(discard);
    cudaGetLastError();
  };
  prepare();
  bool direct = cudaStreamBeginCaptureToGraph(t.capture, body, nullptr, nullptr, 0, cudaStreamCaptureModeRelaxed) ==
                cudaSuccess;
  if (direct) {
    try {
      run_call(t.blas, c);
    } catch (const CudaError&) {
      abandon();
      direct = false;
    }
  } else {
    cudaGetLastError();
  }
  if (direct) {
    cudaGraph_t captured = nullptr;
    if (cudaStreamEndCapture(t.capture, &captured) == cudaSuccess) return false;
    cudaGetLastError();
  }
  // The body may hold nodes of the failed attempt: child graph nodes go into a fresh body only when it is empty.
  std::size_t nodes = 0;
  SMA_CUDA_CHECK(cudaGraphGetNodes(body, nullptr, &nodes));
  if (nodes != 0)
    throw CudaError("cudaStreamBeginCaptureToGraph", "capture_failed",
                    "cuda::bounded_gemm: capturing a cuBLAS call into a conditional node's body failed midway");
  prepare();
  GraphGuard own;
  SMA_CUDA_CHECK(cudaStreamBeginCapture(t.capture, cudaStreamCaptureModeRelaxed));
  try {
    run_call(t.blas, c);
  } catch (...) {
    abandon();
    throw;
  }
  SMA_CUDA_CHECK(cudaStreamEndCapture(t.capture, &own.g));
  cudaGraphNode_t child = nullptr;
  SMA_CUDA_CHECK(cudaGraphAddChildGraphNode(&child, body, nullptr, 0, own.g));
  return true;
}

Entry build(const std::vector<Piece>& pieces, const BoundedGemm* g, int n, const int* count) {
  const DeviceTools& t = tools();
  // Workspace: a slice per chunk of rows / batch products (they may run at once), one per reduction product.
  std::vector<std::size_t> offset(pieces.size());
  std::vector<std::size_t> bytes(pieces.size());
  std::vector<long long> product_slice(static_cast<std::size_t>(n), -1);
  std::size_t total = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const int p = pieces[i].product;
    if (g[p].bound == GemmBound::reduction) {
      if (product_slice[p] < 0) {
        product_slice[p] = static_cast<long long>(total);
        total += kReduceWorkspace;
      }
      offset[i] = static_cast<std::size_t>(product_slice[p]);
      bytes[i] = kReduceWorkspace;
    } else {
      offset[i] = total;
      bytes[i] = kRowsWorkspace;
      total += kRowsWorkspace;
    }
  }
  Entry e;
  try {
    SMA_CUDA_CHECK(cudaMalloc(&e.workspace, total));
    GraphGuard graph;
    SMA_CUDA_CHECK(cudaGraphCreate(&graph.g, 0));
    ConditionArgs args{};
    args.count = count;
    args.n = static_cast<int>(pieces.size());
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      SMA_CUDA_CHECK(cudaGraphConditionalHandleCreate(&args.handle[i], graph.g, 0, cudaGraphCondAssignDefault));
      args.start[i] = pieces[i].start;
    }
    cudaKernelNodeParams kp{};
    kp.func = reinterpret_cast<void*>(set_conditions_kernel);
    kp.gridDim = dim3(1);
    kp.blockDim = dim3(1);
    void* kargs[] = {&args};
    kp.kernelParams = kargs;
    cudaGraphNode_t setter = nullptr;
    SMA_CUDA_CHECK(cudaGraphAddKernelNode(&setter, graph.g, nullptr, 0, &kp));
    std::vector<cudaGraphNode_t> node(pieces.size(), nullptr);
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      const bool after_previous = pieces[i].chained && i > 0 && pieces[i - 1].product == pieces[i].product;
      const cudaGraphNode_t dep = after_previous ? node[i - 1] : setter;
      cudaGraphNodeParams cp{};
      cp.type = cudaGraphNodeTypeConditional;
      cp.conditional.handle = args.handle[i];
      cp.conditional.type = cudaGraphCondTypeIf;
      cp.conditional.size = 1;
      SMA_CUDA_CHECK(cudaGraphAddNode(&node[i], graph.g, &dep, nullptr, 1, &cp));
      if (capture_into(cp.conditional.phGraph_out[0], t, pieces[i].call,
                       static_cast<char*>(e.workspace) + offset[i], bytes[i]))
        ++cache().stats.child_graphs;
    }
    SMA_CUDA_CHECK(cudaGraphInstantiate(&e.exec, graph.g, 0));
  } catch (...) {
    release(e);
    throw;
  }
  return e;
}

BoundedGemmMode initial_mode() {
  const char* v = std::getenv("SMA_CUDA_BOUNDED_GEMM");
  if (v && (std::string(v) == "full" || std::string(v) == "0")) return BoundedGemmMode::full;
  return BoundedGemmMode::graph;
}

std::atomic<int>& mode_flag() {
  static std::atomic<int> m(static_cast<int>(initial_mode()));
  return m;
}

// See set_bounded_gemm_min_gflop.
std::atomic<double>& min_gflop_flag() {
  static std::atomic<double> v([] {
    const char* e = std::getenv("SMA_CUDA_BOUNDED_MIN_GFLOP");
    return e ? std::atof(e) : 16.0;
  }());
  return v;
}

bool small_product(const BoundedGemm& g) {
  const double flop = 2.0 * g.m * g.n * static_cast<double>(g.k) * g.batch * (g.type == GemmType::fp32 ? 16 : 1);
  return flop < min_gflop_flag().load() * 1e9;
}

}  // namespace

int bounded_gemm_default_chunk(const BoundedGemm& g) {
  const long long units = units_of(g);
  if (g.bound == GemmBound::batch) return static_cast<int>(std::max<long long>(1, (units + 7) / 8));
  const long long c = ((units + 7) / 8 + 63) / 64 * 64;
  return static_cast<int>(std::max<long long>(64, c));
}

void set_bounded_gemm_mode(BoundedGemmMode mode) { mode_flag().store(static_cast<int>(mode)); }
void set_bounded_gemm_min_gflop(double gflop) {
  if (!(gflop >= 0.0)) throw ValueError(str_cat("cuda::set_bounded_gemm_min_gflop: ", gflop, " is not >= 0"));
  min_gflop_flag().store(gflop);
}
double bounded_gemm_min_gflop() { return min_gflop_flag().load(); }
BoundedGemmMode bounded_gemm_mode() { return static_cast<BoundedGemmMode>(mode_flag().load()); }

BoundedGemmStats bounded_gemm_stats() {
  BoundedGemmStats s = cache().stats;
  s.cached = static_cast<long long>(cache().entries.size());
  return s;
}

void clear_bounded_gemm_cache() {
  Cache& c = cache();
  if (c.entries.empty()) return;
  SMA_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto& kv : c.entries) release(kv.second);
  c.entries.clear();
}

void bounded_gemm(const BoundedGemm* products, int n, const int* count, void* stream) {
  if (n < 0 || (n > 0 && !products)) throw ValueError(str_cat("cuda::bounded_gemm: ", n, " products at nullptr"));
  for (int i = 0; i < n; ++i) validate(products[i], i);
  if (!count) throw ValueError("cuda::bounded_gemm: count (the device's row count) is nullptr");
  const auto s = static_cast<cudaStream_t>(stream);
  // Inside a stream capture (a whole training step recorded as one graph: set_step_graph) the cached graph cannot
  // be launched (cudaGraphLaunch into a capturing stream is refused) and a new one could not be built (its
  // cudaMalloc is not allowed there), so the products run whole, as in full mode: on bf16 operands that are zero
  // past S (see the header), which costs only the skipped chunks' time.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  SMA_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
  if (bounded_gemm_mode() == BoundedGemmMode::full || capture != cudaStreamCaptureStatusNone) {
    DeviceTools& t = tools();
    SMA_CUDA_CHECK(cublasSetStream(t.blas, s));
    for (int i = 0; i < n; ++i)
      if (!empty(products[i])) run_call(t.blas, whole(products[i]));
    return;
  }
  std::vector<BoundedGemm> big;
  for (int i = 0; i < n; ++i) {
    if (empty(products[i])) continue;
    if (!small_product(products[i])) {
      big.push_back(products[i]);
      continue;
    }
    DeviceTools& t = tools();
    SMA_CUDA_CHECK(cublasSetStream(t.blas, s));
    run_call(t.blas, whole(products[i]));
  }
  products = big.data();
  n = static_cast<int>(big.size());
  std::vector<Piece> pieces;
  for (int i = 0; i < n; ++i) split(products[i], i, pieces);
  if (pieces.empty()) return;
  if (pieces.size() > static_cast<std::size_t>(kBoundedGemmMaxChunks))
    throw ValueError(str_cat("cuda::bounded_gemm: ", pieces.size(), " chunks in one call, at most ",
                             kBoundedGemmMaxChunks, " (raise BoundedGemm::chunk)"));
  int device = 0;
  SMA_CUDA_CHECK(cudaGetDevice(&device));
  Cache& c = cache();
  std::vector<long long> key = key_of(products, n, count, device);
  auto it = c.entries.find(key);
  if (it == c.entries.end()) {
    if (static_cast<int>(c.entries.size()) >= kBoundedGemmCacheEntries) {
      auto oldest = c.entries.begin();
      for (auto j = c.entries.begin(); j != c.entries.end(); ++j)
        if (j->second.last_use < oldest->second.last_use) oldest = j;
      // Its graph may still be running, and its workspace with it.
      SMA_CUDA_CHECK(cudaDeviceSynchronize());
      release(oldest->second);
      c.entries.erase(oldest);
    }
    Entry e = build(pieces, products, n, count);
    ++c.stats.builds;
    it = c.entries.emplace(std::move(key), e).first;
  }
  it->second.last_use = ++c.tick;
  SMA_CUDA_CHECK(cudaGraphLaunch(it->second.exec, s));
  ++c.stats.launches;
}

}  // namespace sma::cuda
