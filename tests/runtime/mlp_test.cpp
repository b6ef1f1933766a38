// ops::mlp on the CPU: the three ops it stands for (linear, gelu, linear), bit for bit, in f32 and in
// bf16 (the CPU's widening path), output and every gradient, under every EpilogueFusion setting (the fusion
// is a CUDA bf16 matter); its gradients against central finite differences; its errors. The CUDA
// paths are checked against these on a GPU (tests/gpu/mlp_cuda_test.cpp).
#include <gtest/gtest.h>


#include "runtime/autograd.h"
#include "runtime/ops.h"
#include "tests/support/errors.h"
#include "tests/support/gradcheck.h"
#include "tests/support/op_runs.h"

namespace kraken::runtime {
namespace {

using testing::expect_gradients_match;
using testing::message_of;
using testing::random_leaf;
using testing::run_op;

// Leaves of the given dtype (bf16: the f32 values rounded), requiring grad unless told otherwise.
Tensor leaf(const Shape& shape, uint64_t seed, float std, DType dtype, bool requires_grad = true) {
  Tensor t = random_leaf(shape, seed, std);
  t.set_requires_grad(false);
  if (dtype != DType::F32) t = t.to(dtype);
  t.set_requires_grad(requires_grad);
  return t;
}

void expect_bits_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  testing::expect_bits_equal(got, want, what, "the three ops");
}

Tensor three_ops(const std::vector<Tensor>& v) {
  return ops::linear(ops::gelu(ops::linear(v[0], v[1], v[2])), v[3], v[4]);
}
Tensor fused_op(const std::vector<Tensor>& v) { return ops::mlp(v[0], v[1], v[2], v[3], v[4]); }

void expect_three_ops(const std::vector<Tensor>& inputs, const std::string& what) {
  const testing::OpRun ref = run_op(three_ops, inputs);
  for (ops::EpilogueFusion fusion :
       {ops::EpilogueFusion::kOff, ops::EpilogueFusion::kGelu, ops::EpilogueFusion::kGeluAndBiasGrads,
        ops::EpilogueFusion::kGeluAndFcBiasGrad}) {
    ops::EpilogueFusionScope scope(fusion);
    const std::string w = what + ", fusion " + std::to_string(static_cast<int>(fusion));
    const testing::OpRun got = run_op(fused_op, inputs);
    expect_bits_equal(got.out, ref.out, w + ": output");
    const char* names[] = {"dx", "dW_fc", "db_fc", "dW_proj", "db_proj"};
    for (size_t k = 0; k < inputs.size(); ++k) expect_bits_equal(got.grads[k], ref.grads[k], w + ": " + names[k]);
  }
}

std::vector<Tensor> block(DType dtype, int64_t C, int64_t H, int64_t Co, bool biases, uint64_t seed) {
  return {leaf({3, 5, C}, seed, 1.0f, dtype), leaf({H, C}, seed + 1, 0.3f, dtype),
          biases ? leaf({H}, seed + 2, 0.5f, dtype) : Tensor(), leaf({Co, H}, seed + 3, 0.2f, dtype),
          biases ? leaf({Co}, seed + 4, 0.5f, dtype) : Tensor()};
}

TEST(Mlp, IsTheThreeOpsBitForBitInF32) {
  expect_three_ops(block(DType::F32, 16, 64, 16, true, 1), "f32, GPT-2's 4× expansion");
  expect_three_ops(block(DType::F32, 10, 36, 7, true, 11), "f32, hidden 36 and out 7");
  expect_three_ops(block(DType::F32, 16, 64, 16, false, 21), "f32, no biases (the Kraken presets)");
}

TEST(Mlp, IsTheThreeOpsBitForBitInBf16) {
  expect_three_ops(block(DType::BF16, 16, 64, 16, true, 31), "bf16 (widened on the CPU)");
  expect_three_ops(block(DType::BF16, 24, 40, 24, false, 41), "bf16, no biases");
}

TEST(Mlp, IsTheThreeOpsWhenOnlySomeInputsNeedGradients) {
  // Megatron's c_proj has no bias in the op (it is added after the all-reduce); frozen inputs get none.
  std::vector<Tensor> v = block(DType::F32, 16, 64, 16, true, 51);
  v[4] = Tensor();
  v[0].set_requires_grad(false);
  expect_three_ops(v, "f32, input frozen, no c_proj bias");
  v = block(DType::F32, 16, 64, 16, true, 61);
  v[1].set_requires_grad(false);
  v[3].set_requires_grad(false);
  expect_three_ops(v, "f32, weights frozen");
}

TEST(Mlp, EvaluationWithoutGradientsIsTheThreeOps) {
  const std::vector<Tensor> v = block(DType::F32, 16, 64, 16, true, 71);
  NoGrad no_grad;
  expect_bits_equal(fused_op(v).to_vector(), three_ops(v).to_vector(), "no-grad output");
}

TEST(GradCheck, MlpEveryInput) {
  expect_gradients_match(fused_op, block(DType::F32, 6, 24, 5, true, 81));
}

TEST(GradCheck, MlpWithoutBiases) {
  expect_gradients_match(fused_op, block(DType::F32, 8, 16, 8, false, 91));
}

TEST(Mlp, ShapeErrorsNameTheWeights) {
  const Tensor x = Tensor::zeros({2, 8}), w_fc = Tensor::zeros({32, 8}), w_proj = Tensor::zeros({8, 32});
  std::string msg = message_of([&] { ops::mlp(x, Tensor::zeros({32, 7}), Tensor(), w_proj, Tensor()); });
  EXPECT_NE(msg.find("(2, 8)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(32, 7)"), std::string::npos) << msg;
  msg = message_of([&] { ops::mlp(x, w_fc, Tensor(), Tensor::zeros({8, 30}), Tensor()); });
  EXPECT_NE(msg.find("(8, 30)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("32"), std::string::npos) << msg;
  msg = message_of([&] { ops::mlp(x, w_fc, Tensor::zeros({31}), w_proj, Tensor()); });
  EXPECT_NE(msg.find("c_fc bias"), std::string::npos) << msg;
  msg = message_of([&] { ops::mlp(x, w_fc, Tensor(), w_proj, Tensor::zeros({9})); });
  EXPECT_NE(msg.find("c_proj bias"), std::string::npos) << msg;
  msg = message_of([&] { ops::mlp(x.to(DType::BF16), w_fc, Tensor(), w_proj, Tensor()); });
  EXPECT_NE(msg.find("mlp"), std::string::npos) << msg;
}

TEST(Mlp, FusionScopeSetsAndRestoresTheThreadsSetting) {
  const ops::EpilogueFusion before = ops::epilogue_fusion();
  {
    ops::EpilogueFusionScope off(ops::EpilogueFusion::kOff);
    EXPECT_EQ(ops::epilogue_fusion(), ops::EpilogueFusion::kOff);
    {
      ops::EpilogueFusionScope one(ops::EpilogueFusion::kGelu);
      EXPECT_EQ(ops::epilogue_fusion(), ops::EpilogueFusion::kGelu);
    }
    EXPECT_EQ(ops::epilogue_fusion(), ops::EpilogueFusion::kOff);
  }
  EXPECT_EQ(ops::epilogue_fusion(), before);
}

}  // namespace
}  // namespace kraken::runtime
