// Tensor: a shape, a dtype and a device over shared storage, plus what autograd needs.
//
// Tensors are handles: copying one is cheap and both copies name the same data (as in PyTorch).
// Data is always contiguous row-major; a view (reshape, a range of rows) shares the storage at an
// element offset. Differentiable operations live in runtime/ops.h; this file has only what makes,
// moves and inspects tensors.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/allocator.h"
#include "runtime/dtype.h"

namespace kraken::runtime {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "(4, 256, 768)"
int64_t shape_numel(const Shape& shape);
// The multi-index of flat position `flat` in `shape`, for messages: "(1, 3)".
std::string index_str(const Shape& shape, int64_t flat);

// Bytes on one device. Owns them (through an Allocator) or wraps memory owned elsewhere (a mapped
// file), in which case `release` runs when the last tensor lets go.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  Storage(void* data, size_t bytes, Device device, std::function<void()> release);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
  Allocator* allocator_ = nullptr;
  std::function<void()> release_;
};

class Node;
struct TensorImpl;

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- making tensors ----------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, float value, Device device = Device::cpu());  // f32
  static Tensor ones(const Shape& shape, Device device = Device::cpu()) { return full(shape, 1.0f, device); }
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape, Device device = Device::cpu());
  static Tensor from_ints(const std::vector<int32_t>& values, const Shape& shape, Device device = Device::cpu());
  // A tensor over existing storage at an element offset (views, mapped files).
  static Tensor from_storage(std::shared_ptr<Storage> storage, int64_t offset, const Shape& shape, DType dtype);

  // ---- what it is --------------------------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const;
  DType dtype() const;
  Device device() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }
  std::string describe() const;  // "f32 (4, 256) on cpu"

  // Raw element pointer on the tensor's device. data<T>() checks that T matches the dtype.
  void* data_ptr() const;
  template <typename T>
  T* data() const;

  // ---- moving and copying (not differentiable; see ops::cast for the differentiable cast) --------
  Tensor to(const Device& device) const;  // same tensor when already there
  Tensor to(DType dtype) const;           // f32 <-> bf16, i32/u16 -> f32, u16 -> i32
  Tensor clone() const;
  Tensor detach() const;                  // same storage, no autograd history
  void copy_from(const Tensor& src);      // same shape and dtype, any devices
  void fill_(float value);                // f32 only
  void zero_();
  float item() const;                     // one f32 element
  std::vector<float> to_vector() const;   // f32 (bf16 is widened)
  std::vector<int32_t> to_int_vector() const;  // i32 or u16

  // ---- differentiable views (implemented with the ops) ----------------------------------------
  Tensor reshape(const Shape& shape) const;          // one -1 is inferred
  Tensor slice(int64_t begin, int64_t end) const;    // rows [begin, end) of dim 0

  // ---- autograd ------------------------------------------------------------------------------
  bool requires_grad() const;              // a leaf that wants a gradient, or the result of one
  bool is_leaf() const;
  Tensor& set_requires_grad(bool value);   // leaves only
  Tensor grad() const;                     // the accumulated gradient of a leaf (undefined if none)
  void set_grad(const Tensor& grad);       // e.g. a view into a flat gradient buffer
  void zero_grad();                        // zero in place, keeping the buffer
  // Runs after backward() has added this leaf's last gradient contribution of the pass.
  void add_grad_ready_hook(std::function<void(Tensor&)> hook);
  const std::shared_ptr<Node>& grad_fn() const;
  int output_nr() const;

  // A human name (parameters carry their dotted name) used in error messages.
  const std::string& name() const;
  Tensor& set_name(const std::string& name);

  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& other) const { return impl_ == other.impl_; }
  bool shares_storage(const Tensor& other) const;

 private:
  void require_defined(const char* what) const;
  std::shared_ptr<TensorImpl> impl_;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements of dtype
  Shape shape;
  int64_t numel = 0;
  DType dtype = DType::F32;
  std::string name;

  // autograd: a leaf has requires_grad and no grad_fn; a result has grad_fn (and output_nr in it).
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;
  int output_nr = 0;
  std::shared_ptr<TensorImpl> grad;
  std::vector<std::function<void(Tensor&)>> grad_ready_hooks;
};

template <typename T>
struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::F32; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::I32; };
template <> struct DTypeOf<uint16_t> { static constexpr DType value = DType::U16; };

void check_dtype_for_data(const Tensor& t, DType requested);

template <typename T>
T* Tensor::data() const {
  check_dtype_for_data(*this, DTypeOf<T>::value);
  return static_cast<T*>(data_ptr());
}

// Zeroes every defined tensor, as zero_() on each; on a GPU the f32 ones take one kernel launch per
// kernels::kCastsPerLaunch tensors instead of a cudaMemsetAsync each (Module::zero_grad: a model's
// ~150–200 gradients between steps).
void zero_all(const std::vector<Tensor>& tensors);

// Checks used by every op; each throws kraken::Error naming the op and both operands.
void check_same_shape(const char* op, const Tensor& a, const Tensor& b);
void check_same_device(const char* op, const Tensor& a, const Tensor& b);
void check_dtype(const char* op, const Tensor& t, DType expected, const char* which = "input");
void check_dim(const char* op, const Tensor& t, int64_t dims, const char* which = "input");
void check_defined(const char* op, const Tensor& t, const char* which = "input");

}  // namespace kraken::runtime
