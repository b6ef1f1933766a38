// ops::cast_many on the GPU (kernels::cast_*_many_cuda, one launch per kernels::kCastsPerLaunch tensors)
// against one ops::cast per tensor: the same bits forward (f32 → bf16, round to nearest even) and
// backward (bf16 → f32, exact), over GPT-2 124M's product weights (wte's 38.6M elements take more than
// one pass of the blocks the kernel gives one tensor), odd lengths, views that start off 16-byte
// alignment, and more tensors than one launch takes; and backward again into the gradients the first
// left (added in place). The small ones are also held to the CPU's bits.
// (How long each way takes is bench/gpu_train_bench's "cast … GPT-2's 97 weights" rows.) Skips without
// a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "kernels/elementwise.h"
#include "runtime/allocator.h"
#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "runtime/rng.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::testing {
namespace {

using runtime::DType;
using runtime::Shape;
using runtime::Tensor;
namespace ops = runtime::ops;

// The weights GPT-2 124M's products use (models/kraken.cpp, product_params and the tied head).
std::vector<Shape> gpt2_product_shapes() {
  const int64_t C = 768;
  std::vector<Shape> shapes;
  for (int layer = 0; layer < 12; ++layer)
    for (const Shape& s : {Shape{3 * C, C}, Shape{3 * C}, Shape{C, C}, Shape{C}, Shape{4 * C, C}, Shape{4 * C},
                           Shape{C, 4 * C}, Shape{C}})
      shapes.push_back(s);
  shapes.push_back({50304, C});
  return shapes;
}

// Raw bits of a tensor copied to the host (bf16 as 16-bit, f32 as 32-bit patterns).
std::vector<uint32_t> raw_bits(const Tensor& t) {
  const Tensor host = t.to(runtime::Device::cpu());
  std::vector<uint32_t> out(static_cast<size_t>(t.numel()));
  if (t.dtype() == DType::BF16) {
    const uint16_t* p = host.data<uint16_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  } else if (!out.empty()) {
    std::memcpy(out.data(), host.data<float>(), out.size() * 4);
  }
  return out;
}

void expect_same_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const std::vector<uint32_t> a = raw_bits(got), b = raw_bits(want);
  size_t differ = 0, first = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i] && differ++ == 0) first = i;
  EXPECT_EQ(differ, 0u) << what << ": " << differ << " of " << a.size() << " elements differ, the first at " << first
                        << " (" << std::hex << a[first] << " vs " << b[first] << ")";
}

TEST(GpuCastMany, IsOneCastPerTensorBitForBitForwardAndBackward) {
  KRAKEN_REQUIRE_GPU();
  const runtime::Device device = test_device();
  std::vector<Shape> shapes = gpt2_product_shapes();
  const size_t gpt2 = shapes.size();
  for (int64_t k = 0; shapes.size() < gpt2 + static_cast<size_t>(kernels::kCastsPerLaunch); ++k)
    shapes.push_back({1 + (k * 37) % 301});  // lengths of every residue mod 8
  runtime::Generator gen(11, 5);
  std::vector<Tensor> many, single;
  for (size_t k = 0; k < shapes.size(); ++k) {
    Tensor values = Tensor::empty(shapes[k], DType::F32, device);
    gen.fill_normal(values, 0.0f, 3.0f);
    Tensor a = values, b = values.clone();
    if (k >= gpt2 && k % 3 != 0) {  // a view k mod 4 elements into its storage: most start misaligned
      const int64_t n = shapes[k][0], skip = static_cast<int64_t>(k % 4);
      Tensor wider = Tensor::empty({n + skip}, DType::F32, device);
      gen.fill_normal(wider, 0.0f, 3.0f);
      a = wider.slice(skip, n + skip);
      b = a.clone();
    }
    many.push_back(a.set_requires_grad(true));
    single.push_back(b.set_requires_grad(true));
  }
  const std::vector<Tensor> outs = ops::cast_many(many, DType::BF16);
  std::vector<Tensor> single_outs, seeds;
  for (size_t k = 0; k < shapes.size(); ++k) {
    single_outs.push_back(ops::cast(single[k], DType::BF16));
    seeds.push_back(ops::scale(single_outs[k].detach(), -1.75f));  // bf16 gradients, different from the values
  }
  for (size_t k = 0; k < shapes.size(); ++k) {
    expect_same_bits(outs[k], single_outs[k], "forward, tensor " + std::to_string(k));
    if (k >= gpt2)
      expect_same_bits(outs[k].to(runtime::Device::cpu()), single[k].detach().to(runtime::Device::cpu()).to(DType::BF16),
                       "forward against the CPU, tensor " + std::to_string(k));
  }
  runtime::backward(outs, seeds);
  runtime::backward(single_outs, seeds);
  for (size_t k = 0; k < shapes.size(); ++k)
    expect_same_bits(many[k].grad(), single[k].grad(), "gradient, tensor " + std::to_string(k));
  // Again, now that every tensor has a gradient: cast_many's backward adds into it in one launch per
  // kCastsPerLaunch tensors (kernels::accumulate_bf16_many_cuda), the single casts through the engine's
  // widen-then-add; the same bits.
  const std::vector<Tensor> outs2 = ops::cast_many(many, DType::BF16);
  std::vector<Tensor> single_outs2;
  for (size_t k = 0; k < shapes.size(); ++k) single_outs2.push_back(ops::cast(single[k], DType::BF16));
  runtime::backward(outs2, seeds);
  runtime::backward(single_outs2, seeds);
  for (size_t k = 0; k < shapes.size(); ++k)
    expect_same_bits(many[k].grad(), single[k].grad(), "gradient added into the first, tensor " + std::to_string(k));
  // runtime::zero_all, as Module::zero_grad calls it: every gradient zero (the f32 ones in one launch per
  // kCastsPerLaunch tensors), a bf16 tensor among them too (zero_() of its own), nothing else touched.
  std::vector<Tensor> grads;
  for (const Tensor& t : many) grads.push_back(t.grad());
  const Tensor bf16 = seeds[0].clone(), untouched = single[0].grad().clone();
  grads.push_back(bf16);
  runtime::zero_all(grads);
  for (size_t k = 0; k < grads.size(); ++k)
    expect_same_bits(grads[k], Tensor::zeros(grads[k].shape(), grads[k].dtype(), device), "zeroed, tensor " + std::to_string(k));
  expect_same_bits(single[0].grad(), untouched, "a gradient not passed to zero_all");
}

}  // namespace
}  // namespace kraken::testing
