#include "runtime/tensor.h"

#include <cstring>
#include <sstream>

#include "kernels/elementwise.h"
#include "kernels/error.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"

namespace kraken::runtime {

std::string shape_str(const Shape& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) out << ",";
  out << ")";
  return out.str();
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) KRAKEN_THROW("negative dimension in shape ", shape_str(shape));
    n *= d;
  }
  return n;
}

std::string index_str(const Shape& shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] == 0 ? 0 : flat % shape[d];
    flat = shape[d] == 0 ? 0 : flat / shape[d];
  }
  return shape_str(idx);
}

// ---- Storage -------------------------------------------------------------------------------------

Storage::Storage(size_t bytes, Device device)
    : bytes_(bytes), device_(device), allocator_(&allocator_for(device)) {
  data_ = allocator_->allocate(bytes);
}

Storage::Storage(void* data, size_t bytes, Device device, std::function<void()> release)
    : data_(data), bytes_(bytes), device_(device), release_(std::move(release)) {}

Storage::~Storage() {
  if (allocator_) allocator_->deallocate(data_, bytes_);
  if (release_) release_();
}

// ---- making ----------------------------------------------------------------------------------------

Tensor Tensor::from_storage(std::shared_ptr<Storage> storage, int64_t offset, const Shape& shape, DType dtype) {
  auto impl = std::make_shared<TensorImpl>();
  impl->numel = shape_numel(shape);
  const size_t end = static_cast<size_t>(offset + impl->numel) * dtype_size(dtype);
  KRAKEN_CHECK(offset >= 0 && end <= storage->bytes(), "view past the end of its storage: offset ", offset,
               " shape ", shape_str(shape), " storage bytes ", storage->bytes());
  impl->storage = std::move(storage);
  impl->offset = offset;
  impl->shape = shape;
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  const int64_t n = shape_numel(shape);
  auto storage = std::make_shared<Storage>(static_cast<size_t>(n) * dtype_size(dtype), device);
  return from_storage(std::move(storage), 0, shape, dtype);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(const Shape& shape, float value, Device device) {
  Tensor t = empty(shape, DType::F32, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& values, const Shape& shape, Device device) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape))
    KRAKEN_THROW("from_vector: ", values.size(), " values for shape ", shape_str(shape));
  Tensor t = empty(shape, DType::F32, device);
  copy_bytes(t.data_ptr(), device, values.data(), Device::cpu(), t.nbytes());
  return t;
}

Tensor Tensor::from_ints(const std::vector<int32_t>& values, const Shape& shape, Device device) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape))
    KRAKEN_THROW("from_vector: ", values.size(), " values for shape ", shape_str(shape));
  Tensor t = empty(shape, DType::I32, device);
  copy_bytes(t.data_ptr(), device, values.data(), Device::cpu(), t.nbytes());
  return t;
}

// ---- inspecting ------------------------------------------------------------------------------------

void Tensor::require_defined(const char* what) const {
  if (!impl_) KRAKEN_THROW(what, ": the tensor is undefined");
}

const Shape& Tensor::shape() const {
  require_defined("shape()");
  return impl_->shape;
}

int64_t Tensor::size(int64_t d) const {
  const int64_t n = dim();
  const int64_t idx = d < 0 ? d + n : d;
  if (idx < 0 || idx >= n) KRAKEN_THROW("size(", d, ") of a tensor of shape ", shape_str(shape()));
  return impl_->shape[static_cast<size_t>(idx)];
}

int64_t Tensor::numel() const {
  require_defined("numel()");
  return impl_->numel;
}
DType Tensor::dtype() const {
  require_defined("dtype()");
  return impl_->dtype;
}
Device Tensor::device() const {
  require_defined("device()");
  return impl_->storage->device();
}

std::string Tensor::describe() const {
  if (!impl_) return "undefined tensor";
  std::string out = std::string(dtype_name(dtype())) + " " + shape_str(shape()) + " on " + device().str();
  if (!impl_->name.empty()) out = impl_->name + ": " + out;
  return out;
}

void* Tensor::data_ptr() const {
  require_defined("data_ptr()");
  return static_cast<char*>(impl_->storage->data()) + impl_->offset * static_cast<int64_t>(dtype_size(impl_->dtype));
}

void check_dtype_for_data(const Tensor& t, DType requested) {
  const DType actual = t.dtype();
  if (actual == requested || (requested == DType::U16 && actual == DType::BF16)) return;
  KRAKEN_THROW("data<", dtype_name(requested), ">() on ", t.describe());
}

bool Tensor::shares_storage(const Tensor& other) const {
  return impl_ && other.impl_ && impl_->storage == other.impl_->storage;
}

// ---- moving and copying --------------------------------------------------------------------------

Tensor Tensor::to(const Device& device) const {
  require_defined("to(device)");
  if (device == this->device()) return *this;
  Tensor out = empty(shape(), dtype(), device);
  copy_bytes(out.data_ptr(), device, data_ptr(), this->device(), nbytes());
  return out;
}

Tensor Tensor::to(DType target) const {
  require_defined("to(dtype)");
  const DType source = dtype();
  if (source == target) return *this;
  const Device dev = device();
  Tensor out = empty(shape(), target, dev);
  const int64_t n = numel();
  if (dev.is_cpu()) {
    if (source == DType::F32 && target == DType::BF16)
      kernels::cast_f32_to_bf16_cpu(out.data<uint16_t>(), data<float>(), n);
    else if (source == DType::BF16 && target == DType::F32)
      kernels::cast_bf16_to_f32_cpu(out.data<float>(), data<uint16_t>(), n);
    else if (source == DType::I32 && target == DType::F32)
      kernels::cast_i32_to_f32_cpu(out.data<float>(), data<int32_t>(), n);
    else if (source == DType::U16 && target == DType::I32)
      kernels::cast_u16_to_i32_cpu(out.data<int32_t>(), data<uint16_t>(), n);
    else if (source == DType::U16 && target == DType::F32) {
      Tensor wide = to(DType::I32);
      kernels::cast_i32_to_f32_cpu(out.data<float>(), wide.data<int32_t>(), n);
    } else
      KRAKEN_THROW("cast from ", dtype_name(source), " to ", dtype_name(target), " is not supported");
    return out;
  }
#if KRAKEN_WITH_CUDA
  if (source == DType::F32 && target == DType::BF16)
    kernels::cast_f32_to_bf16_cuda(out.data<uint16_t>(), data<float>(), n, compute_stream(dev));
  else if (source == DType::BF16 && target == DType::F32)
    kernels::cast_bf16_to_f32_cuda(out.data<float>(), data<uint16_t>(), n, compute_stream(dev));
  else
    return to(Device::cpu()).to(target).to(dev);  // rare casts (token ids) go through the host
  return out;
#else
  KRAKEN_THROW("cast on ", dev.str(), ": this build has no CUDA");
#endif
}

Tensor Tensor::clone() const {
  require_defined("clone()");
  Tensor out = empty(shape(), dtype(), device());
  copy_bytes(out.data_ptr(), device(), data_ptr(), device(), nbytes());
  return out;
}

Tensor Tensor::detach() const {
  require_defined("detach()");
  Tensor out = from_storage(impl_->storage, impl_->offset, impl_->shape, impl_->dtype);
  out.impl_->name = impl_->name;
  return out;
}

void Tensor::copy_from(const Tensor& src) {
  require_defined("copy_from()");
  check_defined("copy_from", src, "source");
  if (src.shape() != shape() || src.dtype() != dtype())
    KRAKEN_THROW("copy_from: source ", src.describe(), " does not match destination ", describe());
  copy_bytes(data_ptr(), device(), src.data_ptr(), src.device(), nbytes());
}

void Tensor::fill_(float value) {
  check_dtype("fill_", *this, DType::F32, "tensor");
  if (device().is_cpu()) {
    kernels::fill_cpu(data<float>(), value, numel());
    return;
  }
#if KRAKEN_WITH_CUDA
  kernels::fill_cuda(data<float>(), value, numel(), compute_stream(device()));
#endif
}

void Tensor::zero_() {
  require_defined("zero_()");
  zero_bytes(data_ptr(), device(), nbytes());
}

void zero_all(const std::vector<Tensor>& tensors) {
#if KRAKEN_WITH_CUDA
  std::vector<const Tensor*> batched;  // f32 on CUDA, in the order given
  for (const Tensor& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    if (t.device().is_cuda() && t.dtype() == DType::F32)
      batched.push_back(&t);
    else
      Tensor(t).zero_();  // (a handle: the data is shared)
  }
  // One call per device, in the order of each device's first tensor.
  std::vector<bool> done(batched.size(), false);
  for (size_t i = 0; i < batched.size(); ++i) {
    if (done[i]) continue;
    const Device device = batched[i]->device();
    std::vector<float*> outs;
    std::vector<int64_t> ns;
    for (size_t j = i; j < batched.size(); ++j) {
      if (done[j] || batched[j]->device() != device) continue;
      outs.push_back(batched[j]->data<float>()), ns.push_back(batched[j]->numel());
      done[j] = true;
    }
    kernels::zero_many_cuda(outs.data(), ns.data(), static_cast<int64_t>(outs.size()), compute_stream(device));
  }
#else
  for (Tensor t : tensors)  // (handles: the data is shared)
    if (t.defined()) t.zero_();
#endif
}

float Tensor::item() const {
  require_defined("item()");
  if (numel() != 1) KRAKEN_THROW("item() needs one element, got ", describe());
  return to_vector()[0];
}

std::vector<float> Tensor::to_vector() const {
  require_defined("to_vector()");
  Tensor host = to(Device::cpu());
  if (host.dtype() != DType::F32) host = host.to(DType::F32);
  const float* p = host.data<float>();
  return std::vector<float>(p, p + host.numel());
}

std::vector<int32_t> Tensor::to_int_vector() const {
  require_defined("to_int_vector()");
  Tensor host = to(Device::cpu());
  if (host.dtype() == DType::U16) host = host.to(DType::I32);
  const int32_t* p = host.data<int32_t>();
  return std::vector<int32_t>(p, p + host.numel());
}

Tensor Tensor::reshape(const Shape& shape) const { return ops::reshape(*this, shape); }
Tensor Tensor::slice(int64_t begin, int64_t end) const { return ops::slice(*this, begin, end); }

// ---- autograd --------------------------------------------------------------------------------------

bool Tensor::requires_grad() const { return impl_ && (impl_->requires_grad || impl_->grad_fn); }
bool Tensor::is_leaf() const { return impl_ && !impl_->grad_fn; }

Tensor& Tensor::set_requires_grad(bool value) {
  require_defined("set_requires_grad()");
  if (impl_->grad_fn) KRAKEN_THROW("set_requires_grad on ", describe(), ": only leaf tensors can be marked");
  if (value && dtype() != DType::F32 && dtype() != DType::BF16)
    KRAKEN_THROW("set_requires_grad on ", describe(), ": only floating-point tensors have gradients");
  impl_->requires_grad = value;
  return *this;
}

Tensor Tensor::grad() const {
  require_defined("grad()");
  return Tensor(impl_->grad);
}

void Tensor::set_grad(const Tensor& grad) {
  require_defined("set_grad()");
  if (grad.defined() && (grad.shape() != shape() || grad.device() != device()))
    KRAKEN_THROW("set_grad: gradient ", grad.describe(), " does not match ", describe());
  impl_->grad = grad.impl_;
}

void Tensor::zero_grad() {
  require_defined("zero_grad()");
  if (impl_->grad) Tensor(impl_->grad).zero_();
}

void Tensor::add_grad_ready_hook(std::function<void(Tensor&)> hook) {
  require_defined("add_grad_ready_hook()");
  impl_->grad_ready_hooks.push_back(std::move(hook));
}

const std::shared_ptr<Node>& Tensor::grad_fn() const {
  static const std::shared_ptr<Node> none;
  return impl_ ? impl_->grad_fn : none;
}

int Tensor::output_nr() const { return impl_ ? impl_->output_nr : 0; }

const std::string& Tensor::name() const {
  static const std::string empty_name;
  return impl_ ? impl_->name : empty_name;
}

Tensor& Tensor::set_name(const std::string& name) {
  require_defined("set_name()");
  impl_->name = name;
  return *this;
}

// ---- checks ------------------------------------------------------------------------------------------

void check_defined(const char* op, const Tensor& t, const char* which) {
  if (!t.defined()) KRAKEN_THROW(op, ": ", which, " is an undefined tensor");
}

void check_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  check_defined(op, a, "first operand");
  check_defined(op, b, "second operand");
  if (a.shape() != b.shape())
    KRAKEN_THROW(op, ": shapes differ: ", shape_str(a.shape()), " vs ", shape_str(b.shape()));
}

void check_same_device(const char* op, const Tensor& a, const Tensor& b) {
  if (a.device() != b.device())
    KRAKEN_THROW(op, ": operands on different devices: ", a.describe(), " vs ", b.describe());
}

void check_dtype(const char* op, const Tensor& t, DType expected, const char* which) {
  check_defined(op, t, which);
  if (t.dtype() != expected)
    KRAKEN_THROW(op, ": ", which, " must be ", dtype_name(expected), ", got ", t.describe());
}

void check_dim(const char* op, const Tensor& t, int64_t dims, const char* which) {
  check_defined(op, t, which);
  if (t.dim() != dims)
    KRAKEN_THROW(op, ": ", which, " must have ", dims, " dimensions, got shape ", shape_str(t.shape()));
}

}  // namespace kraken::runtime
