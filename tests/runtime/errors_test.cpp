// User mistakes get a kraken::Error whose message names both operands.
#include <gtest/gtest.h>

#include "runtime/ops.h"
#include "tests/support/errors.h"

namespace kraken::runtime {
namespace {

using ::kraken::testing::message_of;

TEST(OpErrors, ShapeMismatchNamesBothShapes) {
  Tensor a = Tensor::zeros({2, 3}), b = Tensor::zeros({4, 5});
  const std::string msg = message_of([&] { ops::matmul(a, b); });
  EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(4, 5)"), std::string::npos) << msg;
  const std::string add_msg = message_of([&] { ops::add(a, b); });
  EXPECT_NE(add_msg.find("(2, 3)"), std::string::npos) << add_msg;
  EXPECT_NE(add_msg.find("(4, 5)"), std::string::npos) << add_msg;
  const std::string mul_msg = message_of([&] { ops::mul(a, b); });
  EXPECT_NE(mul_msg.find("(4, 5)"), std::string::npos) << mul_msg;
}

TEST(OpErrors, LinearNamesInputAndWeight) {
  const std::string msg = message_of([] { ops::linear(Tensor::zeros({2, 3}), Tensor::zeros({4, 5})); });
  EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(4, 5)"), std::string::npos) << msg;
}

TEST(OpErrors, DtypeMismatchNamesTheDtype) {
  Tensor ids = Tensor::from_ints({1, 2}, {2});
  const std::string msg = message_of([&] { ops::gelu(ids); });
  EXPECT_NE(msg.find("i32"), std::string::npos) << msg;
  EXPECT_NE(msg.find("f32"), std::string::npos) << msg;
}

TEST(OpErrors, DeviceMismatchNamesBothDevices) {
  // A CUDA tensor cannot be made without a GPU, so build one that claims to live there over host
  // bytes; the device check runs before any kernel touches it.
  Tensor a = Tensor::zeros({2});
  auto storage = std::make_shared<Storage>(a.data_ptr(), a.nbytes(), Device::cuda(0), nullptr);
  Tensor fake = Tensor::from_storage(storage, 0, {2}, DType::F32);
  const std::string msg = message_of([&] { ops::add(a, fake); });
  EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuda:0"), std::string::npos) << msg;
}

TEST(OpErrors, ConcatAndSplitNameTheShapes) {
  const std::string msg = message_of([] { ops::concat({Tensor::zeros({2, 3}), Tensor::zeros({3, 3})}, 1); });
  EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(3, 3)"), std::string::npos) << msg;
  const std::string split_msg = message_of([] { ops::split(Tensor::zeros({2, 5}), {2, 2}, 1); });
  EXPECT_NE(split_msg.find("(2, 5)"), std::string::npos) << split_msg;
}

TEST(OpErrors, ReshapeNamesBothShapes) {
  const std::string msg = message_of([] { ops::reshape(Tensor::zeros({2, 3}), {4, 2}); });
  EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(4, 2)"), std::string::npos) << msg;
}

}  // namespace
}  // namespace kraken::runtime
