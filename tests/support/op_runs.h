// One op run forward and backward, and bit-for-bit comparison of two such runs: for tests that hold a
// fused or grouped op to the plain ops it stands for (tests/runtime/mlp_test.cpp, grouped_ops_test.cpp).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "runtime/autograd.h"
#include "tests/support/gradcheck.h"

namespace kraken::testing {

struct OpRun {
  std::vector<float> out;
  std::vector<std::vector<float>> grads;  // one per input; empty where the input is undefined or has none
};

// f on fresh copies of the inputs (each requiring grad as its input does, so one run's gradients never
// add to another's), then backward seeded with a fixed random projection of the output.
inline OpRun run_op(const OpFn& f, const std::vector<runtime::Tensor>& inputs) {
  std::vector<runtime::Tensor> leaves;
  for (const runtime::Tensor& t : inputs) {
    runtime::Tensor c = t.defined() ? t.detach().clone() : runtime::Tensor();
    if (c.defined()) c.set_requires_grad(t.requires_grad());
    leaves.push_back(c);
  }
  runtime::Tensor y = f(leaves);
  runtime::Tensor seed = random_leaf(y.shape(), 99, 1.0f);
  seed.set_requires_grad(false);
  if (y.dtype() != runtime::DType::F32) seed = seed.to(y.dtype());
  runtime::backward(y, seed);
  OpRun r;
  r.out = y.to_vector();
  for (const runtime::Tensor& t : leaves)
    r.grads.push_back(t.defined() && t.requires_grad() && t.grad().defined() ? t.grad().to_vector()
                                                                             : std::vector<float>());
  return r;
}

// Fails (once, at the first difference) unless got and want hold the same bits.
inline void expect_bits_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what,
                              const char* reference) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &got[i], 4);
    std::memcpy(&y, &want[i], 4);
    if (x != y) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", " << reference << " give " << want[i];
      return;
    }
  }
}

}  // namespace kraken::testing
