#include "tests/gpu/attention_test_util.h"

#include <algorithm>

#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "tests/gpu/gpu_test_util.h"

namespace kraken::testing {

using runtime::Device;
using runtime::DType;
using runtime::Tensor;

std::string AttentionShape::str() const {
  return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " D=" + std::to_string(C / NH) +
         " NH=" + std::to_string(NH);
}

std::vector<uint16_t> bits_of(const Tensor& bf16_cpu) {
  const uint16_t* p = bf16_cpu.data<uint16_t>();
  return std::vector<uint16_t>(p, p + bf16_cpu.numel());
}

std::vector<float> widen_bits(const std::vector<uint16_t>& bits) {
  std::vector<float> out(bits.size());
  kernels::cast_bf16_to_f32_cpu(out.data(), bits.data(), static_cast<int64_t>(bits.size()));
  return out;
}

AttentionCase attention_case(const AttentionShape& s, uint64_t seed, GradientStart dqkv0) {
  AttentionCase c{s, {}, {}, {}, {}, {}, {}, {}};
  const int64_t B = s.B, T = s.T, C = s.C, NH = s.NH;
  const Tensor qkv16 = random_tensor({B, T, 3 * C}, seed).to(DType::BF16);
  const Tensor dout16 = random_tensor({B, T, C}, seed + 1).to(DType::BF16);
  const Tensor dqkv16 = dqkv0 == GradientStart::kRandom ? random_tensor({B, T, 3 * C}, seed + 2, 0.5f).to(DType::BF16)
                                                         : Tensor::zeros({B, T, 3 * C}, DType::BF16);
  c.qkv = bits_of(qkv16);
  c.dout = bits_of(dout16);
  c.dqkv0 = bits_of(dqkv16);
  const std::vector<float> qkv = qkv16.to_vector(), dout = dout16.to_vector();
  std::vector<float> out(static_cast<size_t>(B * T * C));
  c.lse.resize(static_cast<size_t>(B * NH * T));
  kernels::attention_forward_cpu(out.data(), c.lse.data(), qkv.data(), B, T, C, NH);
  c.out_rounded = round_bf16(out);
  c.out_rounded_bits.resize(out.size());
  kernels::cast_f32_to_bf16_cpu(c.out_rounded_bits.data(), out.data(), static_cast<int64_t>(out.size()));
  // Backward on identical inputs: the reference's out as the forward stores it (bf16) and its lse.
  c.dqkv = dqkv16.to_vector();
  kernels::attention_backward_cpu(c.dqkv.data(), dout.data(), qkv.data(), c.out_rounded.data(), c.lse.data(), B, T,
                                  C, NH);
  c.dqkv = round_bf16(c.dqkv);
  return c;
}

#if KRAKEN_WITH_CUDA
DeviceBf16::DeviceBf16(const std::vector<uint16_t>& values, int64_t offset_)
    : offset(offset_), n(static_cast<int64_t>(values.size())) {
  Tensor host = Tensor::zeros({n + offset}, DType::BF16);
  std::copy(values.begin(), values.end(), host.data<uint16_t>() + offset);
  storage = host.to(Device::cuda(0));
}

std::vector<uint16_t> DeviceBf16::bits() const {
  const Tensor host = storage.to(Device::cpu());
  const uint16_t* p = host.data<uint16_t>() + offset;
  return std::vector<uint16_t>(p, p + n);
}
#endif

}  // namespace kraken::testing
