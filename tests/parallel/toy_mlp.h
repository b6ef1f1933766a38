// A toy residual MLP made of runtime ops, shared by the single-process and the mpirun tests of the
// parallel layer: block b computes h ← h + gelu(h·W_bᵀ + b_b), the loss is mean((h − target)²).
// Every value comes from a Philox stream keyed by a seed, so every rank builds the same model and data.
#pragma once

#include <vector>

#include "runtime/ops.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace kraken::testing {

struct ToyMlp {
  std::vector<runtime::Tensor> weights;  // (C, C) per block
  std::vector<runtime::Tensor> biases;   // (C,) per block

  ToyMlp(int blocks, int64_t width, uint64_t seed) {
    runtime::Generator gen(seed);
    for (int b = 0; b < blocks; ++b) {
      runtime::Tensor w = runtime::Tensor::empty({width, width});
      gen.fill_normal(w, 0.0f, 0.4f);
      runtime::Tensor bias = runtime::Tensor::empty({width});
      gen.fill_normal(bias, 0.0f, 0.1f);
      weights.push_back(w.set_requires_grad(true).set_name("block" + std::to_string(b) + ".weight"));
      biases.push_back(bias.set_requires_grad(true).set_name("block" + std::to_string(b) + ".bias"));
    }
  }

  runtime::Tensor block(int b, const runtime::Tensor& h) const {
    return runtime::ops::add(h, runtime::ops::gelu(runtime::ops::linear(h, weights[b], biases[b])));
  }

  // Registration order: block 0's weight and bias first.
  std::vector<runtime::Tensor> parameters() const {
    std::vector<runtime::Tensor> out;
    for (size_t b = 0; b < weights.size(); ++b) {
      out.push_back(weights[b]);
      out.push_back(biases[b]);
    }
    return out;
  }

  void zero_grad() const {
    for (const runtime::Tensor& p : parameters()) runtime::Tensor(p).zero_grad();
  }
};

inline runtime::Tensor toy_loss(const runtime::Tensor& h, const runtime::Tensor& target) {
  runtime::Tensor d = runtime::ops::add(h, runtime::ops::scale(target, -1.0f));
  return runtime::ops::mean(runtime::ops::mul(d, d));
}

// Deterministic data: (rows, width) inputs and targets for micro-batch (or shard) `index`.
inline runtime::Tensor toy_data(int64_t rows, int64_t width, uint64_t seed, uint64_t index) {
  runtime::Generator gen(seed, /*stream=*/index + 1);
  runtime::Tensor t = runtime::Tensor::empty({rows, width});
  gen.fill_normal(t, 0.0f, 1.0f);
  return t;
}

}  // namespace kraken::testing
