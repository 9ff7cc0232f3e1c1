// sma/train/data_parallel.hpp: OpenMP data parallelism across the batch.
//
// WHY      On a few cores, the layers' own parallel loops (over channels, rows, attention blocks) synchronise many
//          times per layer on small pieces of work; splitting the batch instead gives each thread one independent
//          forward + backward and a single reduction at the end. Measured with sma-demo's default model (d_model
//          64, 2 layers, 196 tokens, batch 32, 2 threads, 150 steps) on the 2-core development machine while other
//          builds shared it: 2 shards trained at 58-68k tokens/s, the layers' own 2-thread loops at 5-6k tokens/s
//          (their barriers spin while a core is taken), with the same losses (docs/training.md).
// HOW      Shard k (of S) takes rows [B k / S, B (k+1) / S) of the batch. Shard 0 runs on the model itself; shard k
//          > 0 on replica k, a copy of the model with its own ParamBuffer, whose values are refreshed from the
//          model before every pass. Each shard has its own Context (dropout stream seeded by (seed, shard)) and its
//          own Cache, runs on one thread, and its layers run single-threaded inside it. The replicas' gradients
//          are then added into the model's, shard by shard in a fixed order.
// DETERMINISM For a fixed shard count and seed the results are bitwise reproducible (no atomics, fixed reduction
//          order). Different shard counts give the same maths but round differently (and, with the `reference`
//          routing semantics, a fully activated row changes how its own shard is compressed; use per_row for
//          results that do not depend on the batch split).
// LIMITS   Models with buffers (BatchNorm running statistics) run as one shard: their batch statistics and
//          running averages would otherwise depend on the split. The model must be copy-constructible.
#pragma once

#include <sma/core/param.hpp>
#include <sma/data/dataset.hpp>
#include <sma/train/task.hpp>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef SMA_WITH_BLAS
// OpenBLAS runs its own thread pool; inside our shards every product must stay on the calling thread.
extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_num_threads(void);
#endif

namespace sma::train {

/// How a batch is spread over threads.
enum class Parallelism : std::uint8_t {
  automatic,  ///< shards when the model allows it (no buffers) and threads > 1, else layers
  shards,     ///< split the batch into per-thread shards (falls back to layers for models with buffers)
  layers,     ///< one pass over the whole batch; the layers' own loops use the threads
};

inline const char* to_string(Parallelism p) {
  return p == Parallelism::automatic ? "auto" : p == Parallelism::shards ? "shards" : "layers";
}
inline Parallelism parse_parallelism(const std::string& s) {
  if (s == "auto" || s == "automatic") return Parallelism::automatic;
  if (s == "shards" || s == "batch") return Parallelism::shards;
  if (s == "layers") return Parallelism::layers;
  throw ValueError(str_cat("unknown parallelism '", s, "' (expected auto, shards or layers)"));
}

/// The thread count OpenMP would use when `threads` is 0.
inline int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

namespace detail {

/// Sets OpenBLAS's thread count for a scope, then restores it.
class BlasThreads {
 public:
  explicit BlasThreads(int n) {
#ifdef SMA_WITH_BLAS
    saved_ = openblas_get_num_threads();
    openblas_set_num_threads(n);
#else
    (void)n;
#endif
  }
  ~BlasThreads() {
#ifdef SMA_WITH_BLAS
    openblas_set_num_threads(saved_);
#endif
  }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int saved_ = 1;
};

template <class Model>
bool has_buffers(Model& m) {
  bool any = false;
  for_each_param(m, [&](const std::string&, auto& p) { any = any || !p.trainable(); });
  return any;
}

}  // namespace detail

/// Runs a Task's forward/backward over a batch split into shards (see the header comment).
///
///   DataParallel<ClassificationTask<SeqBoatModel<float>>> dp(model, buffer, /*threads=*/2);
///   buffer.zero_grad();
///   ShardResult r = dp.run(batch, Mode::train, seed, /*backward=*/true);   // gradients now in `buffer`
template <class Task>
class DataParallel {
 public:
  using Model = typename Task::Model;
  using T = typename Task::Scalar;
  using Batch = typename Task::Batch;

  /// `buffer` must be bound to `model`. threads = 0: OpenMP's default.
  DataParallel(Model& model, ParamBuffer<T>& buffer, int threads = 0, Parallelism mode = Parallelism::automatic)
      : model_(&model), buffer_(&buffer), threads_(resolve_threads(threads)) {
    if (buffer.size() == 0 && count_params(model) > 0)
      throw ValueError("DataParallel: the ParamBuffer is not bound to the model");
    const bool can_shard = !detail::has_buffers(model);
    shards_ = (mode != Parallelism::layers && can_shard && threads_ > 1) ? threads_ : 1;
    for (int k = 1; k < shards_; ++k) {
      replicas_.push_back(std::make_unique<Model>(model));
      replica_buffers_.push_back(std::make_unique<ParamBuffer<T>>(*replicas_.back()));
      if (replica_buffers_.back()->size() != buffer.size())
        throw ValueError("DataParallel: a replica's parameters differ from the model's (is the buffer bound to it?)");
    }
    caches_.resize(static_cast<std::size_t>(shards_));
  }

  int shards() const { return shards_; }
  int threads() const { return threads_; }
  Parallelism effective() const { return shards_ > 1 ? Parallelism::shards : Parallelism::layers; }

  /// One pass over `batch`. With `backward`, the gradient of the batch's mean loss is ADDED to the buffer's
  /// gradients (zero them first). Shard k's dropout draws from a stream seeded by mix_seed(seed, k).
  ShardResult run(const Batch& batch, Mode mode, std::uint64_t seed, bool backward) {
    const Index B = Task::rows(batch);
    const Index total = Task::targets(batch);
    const int S = static_cast<int>(std::min<Index>(shards_, B));
    if (S <= 1) {
      Context ctx(mode, data::mix_seed(seed, 0));
      ctx.threads = threads_;
      return Task::run(*model_, ctx, batch, caches_[0], total, backward);
    }
    sync_replicas(S, backward);
    std::vector<ShardResult> results(static_cast<std::size_t>(S));
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(S));
    {
      detail::BlasThreads single(1);
#pragma omp parallel for num_threads(S) schedule(static, 1)
      for (int k = 0; k < S; ++k) {
        try {
          const Index r0 = B * k / S, r1 = B * (k + 1) / S;
          const Batch part = Task::slice(batch, r0, r1);
          Context ctx(mode, data::mix_seed(seed, static_cast<std::uint64_t>(k)));
          ctx.threads = 1;
          Model& m = k == 0 ? *model_ : *replicas_[static_cast<std::size_t>(k - 1)];
          results[static_cast<std::size_t>(k)] = Task::run(m, ctx, part, caches_[static_cast<std::size_t>(k)], total, backward);
        } catch (...) {
          errors[static_cast<std::size_t>(k)] = std::current_exception();
        }
      }
    }
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    if (backward) reduce_gradients(S);
    ShardResult r;
    for (const auto& s : results) r.add(s);
    return r;
  }

  /// The cache of shard k's last pass (shard 0 holds rows [0, B / shards)).
  const typename Task::Cache& cache(int k = 0) const { return caches_.at(static_cast<std::size_t>(k)); }

 private:
  void sync_replicas(int S, bool backward) {
    const std::size_t n = static_cast<std::size_t>(buffer_->size());
    for (int k = 1; k < S; ++k) {
      ParamBuffer<T>& rb = *replica_buffers_[static_cast<std::size_t>(k - 1)];
      std::copy(buffer_->values(), buffer_->values() + n, rb.values());
      if (backward) rb.zero_grad();
    }
  }

  void reduce_gradients(int S) {
    const Index n = buffer_->size();
    T* g = buffer_->grads();
    // Each element sums the shards in the same order whatever the thread count of this loop.
#pragma omp parallel for num_threads(threads_) schedule(static) if (n > (1 << 16))
    for (Index i = 0; i < n; ++i)
      for (int k = 1; k < S; ++k) g[i] += replica_buffers_[static_cast<std::size_t>(k - 1)]->grads()[i];
  }

  Model* model_;
  ParamBuffer<T>* buffer_;
  int threads_ = 1, shards_ = 1;
  std::vector<std::unique_ptr<Model>> replicas_;
  std::vector<std::unique_ptr<ParamBuffer<T>>> replica_buffers_;
  std::vector<typename Task::Cache> caches_;
};

}  // namespace sma::train
