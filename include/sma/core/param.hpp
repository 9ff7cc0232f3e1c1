// sma/core/param.hpp: Param (value + gradient + official name) and ParamBuffer (one flat allocation per model).
#pragma once

#include <sma/core/tensor.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace sma {

/// Whether a tensor is trained (has a gradient, the optimiser updates it) or is state such as BatchNorm's running
/// statistics (saved in checkpoints under its official name, never updated by an optimiser).
enum class ParamKind : std::uint8_t { parameter, buffer };

/// One named parameter tensor: value and gradient of the same shape, row-major.
///
/// A Param owns its storage until a ParamBuffer rebinds it into the model's flat allocation; after that it points
/// into the buffer. Copying a Param always makes an owning deep copy, so copied layers never alias each other.
/// `name` is the local official (PyTorch) name, e.g. "weight"; containers prefix it ("seq_layers.0.mx_proj.").
template <class T>
class Param {
 public:
  using Scalar = T;

  Param() = default;
  Param(std::string name, std::vector<Index> shape, ParamKind kind = ParamKind::parameter)
      : name_(std::move(name)), shape_(std::move(shape)), kind_(kind) {
    Index n = 1;
    for (Index d : shape_) {
      if (d < 0) throw ShapeError(str_cat("Param '", name_, "': negative extent in shape ", shape_string(shape_)));
      n *= d;
    }
    own_value_.assign(static_cast<std::size_t>(n), T(0));
    own_grad_.assign(static_cast<std::size_t>(n), T(0));
    value_ = own_value_.data();
    grad_ = own_grad_.data();
    size_ = n;
  }

  Param(const Param& o) : name_(o.name_), shape_(o.shape_), kind_(o.kind_), size_(o.size_) {
    own_value_.assign(o.value_, o.value_ + o.size_);
    own_grad_.assign(o.grad_, o.grad_ + o.size_);
    value_ = own_value_.data();
    grad_ = own_grad_.data();
  }
  Param& operator=(const Param& o) {
    if (this != &o) {
      Param tmp(o);
      *this = std::move(tmp);
    }
    return *this;
  }
  // A moved Param keeps pointing where the source pointed: into its (moved) own vectors or into a ParamBuffer.
  Param(Param&& o) noexcept { swap(o); }
  Param& operator=(Param&& o) noexcept {
    swap(o);
    return *this;
  }

  const std::string& name() const { return name_; }
  const std::vector<Index>& shape() const { return shape_; }
  ParamKind kind() const { return kind_; }
  bool trainable() const { return kind_ == ParamKind::parameter; }
  Index size() const { return size_; }
  Index rank() const { return static_cast<Index>(shape_.size()); }
  Index dim(Index i) const { return shape_.at(static_cast<std::size_t>(i)); }

  T* data() { return value_; }
  const T* data() const { return value_; }
  T* grad() { return grad_; }
  const T* grad() const { return grad_; }

  VectorMap<T> vec() { return VectorMap<T>(value_, size_); }
  CVectorMap<T> vec() const { return CVectorMap<T>(value_, size_); }
  VectorMap<T> grad_vec() { return VectorMap<T>(grad_, size_); }
  CVectorMap<T> grad_vec() const { return CVectorMap<T>(grad_, size_); }

  /// The value as a row-major matrix: a rank-2 Param as itself, rank 1 as one row, higher ranks as (dim0, rest).
  MatrixMap<T> mat() { return MatrixMap<T>(value_, rows(), cols()); }
  CMatrixMap<T> mat() const { return CMatrixMap<T>(value_, rows(), cols()); }
  MatrixMap<T> grad_mat() { return MatrixMap<T>(grad_, rows(), cols()); }
  CMatrixMap<T> grad_mat() const { return CMatrixMap<T>(grad_, rows(), cols()); }

  void zero_grad() { std::fill(grad_, grad_ + size_, T(0)); }
  void fill(T v) { std::fill(value_, value_ + size_, v); }

  /// Moves storage to external memory (value and grad, `size()` elements each), copying the current contents.
  void rebind(T* value, T* grad) {
    std::copy(value_, value_ + size_, value);
    std::copy(grad_, grad_ + size_, grad);
    value_ = value;
    grad_ = grad;
    std::vector<T>().swap(own_value_);
    std::vector<T>().swap(own_grad_);
  }
  bool owns_storage() const { return value_ == own_value_.data() || size_ == 0; }

 private:
  Index rows() const { return shape_.size() <= 1 ? 1 : shape_[0]; }
  Index cols() const { return shape_.empty() ? 1 : (shape_.size() == 1 ? shape_[0] : size_ / std::max<Index>(1, shape_[0])); }
  void swap(Param& o) noexcept {
    std::swap(name_, o.name_);
    std::swap(shape_, o.shape_);
    std::swap(kind_, o.kind_);
    std::swap(size_, o.size_);
    std::swap(own_value_, o.own_value_);
    std::swap(own_grad_, o.own_grad_);
    std::swap(value_, o.value_);
    std::swap(grad_, o.grad_);
  }

  std::string name_;
  std::vector<Index> shape_;
  ParamKind kind_ = ParamKind::parameter;
  Index size_ = 0;
  std::vector<T> own_value_, own_grad_;
  T* value_ = nullptr;
  T* grad_ = nullptr;
};

namespace detail {

/// A visitor that prepends `prefix` to every name before forwarding to `inner`.
template <class V>
struct PrefixedVisitor {
  std::string prefix;
  V& inner;
  template <class P>
  void operator()(const std::string& name, P& p) const {
    inner(prefix + name, p);
  }
};

}  // namespace detail

/// Visits the params of `child` with names prefixed by `prefix` (which should end in '.'), e.g.
/// `visit_child(v, "mx_proj.", mx_proj_)`. This is how containers build the official dotted names.
template <class V, class Child>
void visit_child(V& v, const std::string& prefix, Child& child) {
  detail::PrefixedVisitor<V> pv{prefix, v};
  child.visit_params(pv);
}

/// Calls `f(full_name, param)` for every Param of `model` (parameters and buffers).
template <class Model, class F>
void for_each_param(Model& model, F&& f) {
  auto v = [&](const std::string& name, auto& p) { f(name, p); };
  model.visit_params(v);
}

/// Sets every trainable gradient of `model` to zero.
template <class Model>
void zero_grad(Model& model) {
  for_each_param(model, [](const std::string&, auto& p) { p.zero_grad(); });
}

/// Number of trainable scalars in `model`.
template <class Model>
Index count_params(Model& model) {
  Index n = 0;
  for_each_param(model, [&](const std::string&, auto& p) {
    if (p.trainable()) n += p.size();
  });
  return n;
}

/// One flat allocation holding every parameter (and buffer) of a model, values and gradients, in visiting order.
/// Binding rebinds each Param into the buffer; the model must not be moved in memory while the buffer is in use
/// (the Params themselves may be, since they keep pointing into the buffer), and the buffer must outlive the
/// model's use of it. Optimisers run one loop over `values()`/`grads()` restricted to `trainable_ranges()`.
template <class T>
class ParamBuffer {
 public:
  struct Entry {
    std::string name;
    Param<T>* param;
    Index offset;
  };

  ParamBuffer() = default;
  template <class Model>
  explicit ParamBuffer(Model& model) {
    bind(model);
  }
  ParamBuffer(const ParamBuffer&) = delete;
  ParamBuffer& operator=(const ParamBuffer&) = delete;

  template <class Model>
  void bind(Model& model) {
    entries_.clear();
    Index total = 0;
    for_each_param(model, [&](const std::string& name, Param<T>& p) {
      entries_.push_back({name, &p, total});
      total += p.size();
    });
    Storage values(static_cast<std::size_t>(total)), grads(static_cast<std::size_t>(total));
    for (auto& e : entries_) e.param->rebind(values.data() + e.offset, grads.data() + e.offset);
    values_ = std::move(values);  // vector move keeps the data pointer, so the rebinding stays valid
    grads_ = std::move(grads);
  }

  const std::vector<Entry>& entries() const { return entries_; }
  Index size() const { return static_cast<Index>(values_.size()); }
  T* values() { return values_.data(); }
  T* grads() { return grads_.data(); }
  const T* values() const { return values_.data(); }
  const T* grads() const { return grads_.data(); }
  void zero_grad() { std::fill(grads_.begin(), grads_.end(), T(0)); }

  /// The Param registered under `name`, or nullptr.
  Param<T>* find(const std::string& name) const {
    for (auto& e : entries_)
      if (e.name == name) return e.param;
    return nullptr;
  }

 private:
  // Aligned to Eigen's largest packet: each parameter then sits at the same alignment in every buffer bound to the
  // same model, and Eigen's vectorised reductions (whose association depends on where a vector starts) round the
  // same way in every run, in every data-parallel replica and after a resume.
  using Storage = std::vector<T, Eigen::aligned_allocator<T>>;
  std::vector<Entry> entries_;
  Storage values_, grads_;
};

}  // namespace sma
